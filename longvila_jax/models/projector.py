"""VILA multimodal projectors: vision features [N, P, Dv] -> LLM tokens [N, T, D].

Port of ``llava/model/multimodal_projector/base_projector.py`` (NVlabs/VILA; Aug-2024 branch
``LongVILA`` and main). The downsampling projectors merge every m x m patch neighbourhood
(m = 2 or 3) into one token by channel concatenation. The patch grid is zero-padded to a
multiple of m first (27 -> 28), *before* the LayerNorm, so edge blocks carry zero sub-vectors
inside the normalised vector. Within a block the sub-vectors are concatenated in row-major
patch order ((2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) for m = 2).

The order of the merged blocks in the output sequence depends on the code generation that
trained the checkpoint (``cfg.projector.token_order``): Aug-2024 code emits them column-major
(token k = block (k % n, k // n)), NVILA-era code row-major (token k = block (k // n, k % n)).

GELU here is the exact (erf) one of ``torch.nn.GELU()``. Sub-module names map to the torch
``nn.Sequential`` slots listed in ``longvila_jax/ckpt/mappings/projector.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from longvila_jax.config.model import ModelConfig
from longvila_jax.core.axes import EMBED, MLP, PROJ_IN, VISION_MLP
from longvila_jax.models.layers import Dense, LayerNorm


def merge_patches(x: jax.Array, m: int, token_order: str) -> jax.Array:
    """Space-to-channel merge of m x m patch neighbourhoods.

    Args:
      x: [N, P, C] patch features, P = s * s patches in row-major order.
      m: merge side (2 or 3); 1 returns ``x`` unchanged.
      token_order: "row_major" or "col_major" order of the merged blocks.

    Returns:
      [N, ceil(s/m)^2, m*m*C]; the grid is zero-padded at the bottom/right to a multiple of m.
    """
    if m == 1:
        return x
    n, p, c = x.shape
    s = math.isqrt(p)
    if s * s != p:
        raise ValueError(f"projector input must be a square patch grid, got {p} patches")
    pad = (-s) % m
    grid = x.reshape(n, s, s, c)
    grid = jnp.pad(grid, ((0, 0), (0, pad), (0, pad), (0, 0)))
    b = (s + pad) // m
    grid = grid.reshape(n, b, m, b, m, c)  # [n, block_row, dr, block_col, dc, c]
    if token_order == "row_major":
        grid = grid.transpose(0, 1, 3, 2, 4, 5)
    elif token_order == "col_major":
        grid = grid.transpose(0, 3, 1, 2, 4, 5)
    else:
        raise ValueError(f"token_order must be 'row_major' or 'col_major', got {token_order!r}")
    return grid.reshape(n, b * b, m * m * c)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class Projector(nnx.Module):
    """The projector selected by ``cfg.projector.type``.

    Sub-modules per type (torch slot in brackets):
      mlp_downsample, mlp_downsample_2x2_fix: norm [1], fc1 [2], fc2 [4];
      mlp_downsample_3x3_fix: norm1 [1], fc1 [2], norm2 [4], fc2 [5], fc3 [7];
      mlp2x_gelu: fc1 [0], fc2 [2]; linear: fc (torch ``layers`` is the Linear itself).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        projector_cfg = cfg.projector
        self.cfg = cfg
        self.type = projector_cfg.type
        self.merge = projector_cfg.merge
        self.token_order = projector_cfg.token_order
        vision_width, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        merged_width = vision_width * self.merge * self.merge
        kwargs = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        dense_kwargs = dict(rngs=rngs, **kwargs)
        eps = projector_cfg.layer_norm_eps
        if projector_cfg.type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.norm = LayerNorm(merged_width, eps=eps, **kwargs)
            self.fc1 = Dense(merged_width, d, axes=(PROJ_IN, MLP), **dense_kwargs)
            self.fc2 = Dense(d, d, axes=(MLP, EMBED), **dense_kwargs)
        elif projector_cfg.type == "mlp_downsample_3x3_fix":
            mid_width = 3 * vision_width
            self.norm1 = LayerNorm(merged_width, eps=eps, **kwargs)
            self.fc1 = Dense(merged_width, mid_width, axes=(PROJ_IN, VISION_MLP), **dense_kwargs)
            self.norm2 = LayerNorm(mid_width, eps=eps, **kwargs)
            self.fc2 = Dense(mid_width, d, axes=(VISION_MLP, MLP), **dense_kwargs)
            self.fc3 = Dense(d, d, axes=(MLP, EMBED), **dense_kwargs)
        elif projector_cfg.type == "mlp2x_gelu":
            self.fc1 = Dense(merged_width, d, axes=(PROJ_IN, MLP), **dense_kwargs)
            self.fc2 = Dense(d, d, axes=(MLP, EMBED), **dense_kwargs)
        elif projector_cfg.type == "linear":
            self.fc = Dense(merged_width, d, axes=(PROJ_IN, EMBED), **dense_kwargs)
        else:  # the config Literal already rejects this; kept for direct construction
            raise ValueError(f"unknown projector type {projector_cfg.type!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Projects vision features.

        Args:
          x: [N, P, vision.hidden_size], P = patches_per_side ** 2 in row-major order.

        Returns:
          [N, tokens_per_frame, llm.hidden_size] in compute dtype.
        """
        x = merge_patches(x, self.merge, self.token_order)
        kind = self.type
        if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            return self.fc2(_gelu(self.fc1(self.norm(x))))
        if kind == "mlp_downsample_3x3_fix":
            h = self.norm2(_gelu(self.fc1(self.norm1(x))))
            return self.fc3(_gelu(self.fc2(h)))
        if kind == "mlp2x_gelu":
            return self.fc2(_gelu(self.fc1(x)))
        return self.fc(x)
