"""PyTorch re-implementation of VILA's multimodal projectors, the test oracle for ours.

Written from the facts in design/longvila.md §3.2 (not from our JAX code): modules form an
``nn.Sequential`` named ``layers`` so the state-dict names are VILA's ``layers.<slot>.*``
(``layers.weight`` for ``linear``). The m x m merge is spelled out block by block with explicit
indices (zero padding at the bottom/right to a multiple of m, sub-patches concatenated in
row-major order inside a block, blocks emitted in ``col_major`` or ``row_major`` order), so it
shares no reshape/transpose logic with ``longvila_jax.models.projector.merge_patches``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BlockMerge(nn.Module):
    """[N, s*s, C] -> [N, ceil(s/m)^2, m*m*C] by explicit per-block concatenation."""

    def __init__(self, m: int, token_order: str):
        super().__init__()
        if token_order not in ("row_major", "col_major"):
            raise ValueError(f"bad token_order {token_order!r}")
        self.m = m
        self.token_order = token_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        s = math.isqrt(p)
        if s * s != p:
            raise ValueError(f"{p} patches do not form a square grid")
        m = self.m
        padded = -(-s // m) * m
        grid = torch.zeros((n, padded, padded, c), dtype=x.dtype)
        grid[:, :s, :s] = x.reshape(n, s, s, c)
        b = padded // m
        if self.token_order == "row_major":
            order = [(i, j) for i in range(b) for j in range(b)]
        else:  # column-major: token k is block-row k % b, block-column k // b
            order = [(i, j) for j in range(b) for i in range(b)]
        tokens = []
        for i, j in order:
            parts = [grid[:, m * i + di, m * j + dj] for di in range(m) for dj in range(m)]
            tokens.append(torch.cat(parts, dim=-1))
        return torch.stack(tokens, dim=1)


class TorchProjector(nn.Module):
    """VILA ``MultimodalProjector`` equivalent.

    Args:
      projector_type: ``mlp_downsample``, ``mlp_downsample_2x2_fix``, ``mlp_downsample_3x3_fix``,
        ``mlp2x_gelu`` or ``linear``.
      mm_hidden_size: vision width Dv.
      hidden_size: LLM width D.
      token_order: block order of the merging types.
    """

    def __init__(
        self, projector_type: str, mm_hidden_size: int, hidden_size: int, token_order: str
    ):
        super().__init__()
        dv, d = mm_hidden_size, hidden_size
        if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                BlockMerge(2, token_order),
                nn.LayerNorm(4 * dv),
                nn.Linear(4 * dv, d),
                nn.GELU(),
                nn.Linear(d, d),
            )
        elif projector_type == "mlp_downsample_3x3_fix":
            self.layers = nn.Sequential(
                BlockMerge(3, token_order),
                nn.LayerNorm(9 * dv),
                nn.Linear(9 * dv, 3 * dv),
                nn.GELU(),
                nn.LayerNorm(3 * dv),
                nn.Linear(3 * dv, d),
                nn.GELU(),
                nn.Linear(d, d),
            )
        elif projector_type == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        elif projector_type == "linear":
            self.layers = nn.Linear(dv, d)
        else:
            raise ValueError(f"unknown projector type {projector_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P, Dv] -> [N, T, D]."""
        return self.layers(x)

    def randomize_(self, generator: torch.Generator) -> TorchProjector:
        """Non-trivial LayerNorm affine params (torch initialises them to 1 and 0)."""
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=generator))
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=generator))
        return self
