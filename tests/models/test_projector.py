"""Projector parity with the PyTorch reference (tests/helpers/torch_projector.py).

Covers every projector type, both block orders, even and odd patch grids (zero padding before
the LayerNorm), the token order itself checked from position-coded patches, and the HF name
table. Tolerance: fp32 max abs error <= 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from helpers.torch_projector import TorchProjector

from longvila_jax.ckpt import mapping
from longvila_jax.config.model import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from longvila_jax.models.projector import Projector, merge_patches

DV, D = 8, 16
MERGING = ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")


def make_cfg(ptype: str, order: str, side: int) -> ModelConfig:
    vision = VisionConfig(
        image_size=side * 4,
        patch_size=4,
        hidden_size=DV,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    llm = LLMConfig(
        vocab_size=32,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return ModelConfig(
        vision=vision, projector=ProjectorConfig(type=ptype, token_order=order), llm=llm
    )


def build(ptype: str, order: str, side: int, seed: int = 0):
    cfg = make_cfg(ptype, order, side)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = TorchProjector(ptype, DV, D, order).randomize_(gen).eval()
    model = nnx.eval_shape(lambda: Projector(cfg, rngs=nnx.Rngs(0)))
    mapping.load_state_dict(
        model, "mm_projector", {k: v.numpy() for k, v in ref.state_dict().items()}
    )
    return cfg, ref, model


CASES = [(t, o, s) for t in MERGING for o in ("col_major", "row_major") for s in (4, 5, 6)]
CASES += [(t, "row_major", 5) for t in ("mlp2x_gelu", "linear")]


@pytest.mark.parametrize("ptype,order,side", CASES)
def test_matches_torch_reference(ptype, order, side):
    cfg, ref, model = build(ptype, order, side)
    x = np.random.RandomState(side).standard_normal((3, side * side, DV)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert got.shape == want.shape == (3, cfg.tokens_per_frame, D)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("order", ["col_major", "row_major"])
@pytest.mark.parametrize("side", [5, 6])
def test_token_order_from_position_codes(m, order, side):
    """Patch (r, c) carries (r + 1, c + 1); padded patches are (0, 0)."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x = np.stack([rows + 1, cols + 1], -1).reshape(1, side * side, 2).astype(np.float32)
    out = np.asarray(merge_patches(x, m, order))[0]
    n = -(-side // m)
    assert out.shape == (n * n, m * m * 2)
    for k in range(n * n):
        i, j = (k % n, k // n) if order == "col_major" else (k // n, k % n)
        want = []
        for dr in range(m):
            for dc in range(m):
                r, c = m * i + dr, m * j + dc
                want += [r + 1, c + 1] if (r < side and c < side) else [0, 0]
        np.testing.assert_array_equal(out[k], want, err_msg=f"token {k}")


def test_orders_differ_on_real_projector():
    """Guards the order setting: the same weights give transposed token grids."""
    _, _, col = build("mlp_downsample", "col_major", 5)
    _, _, row = build("mlp_downsample", "row_major", 5)
    x = np.random.RandomState(0).standard_normal((1, 25, DV)).astype(np.float32)
    a = np.asarray(col(x)).reshape(3, 3, D)  # [block_col, block_row]
    b = np.asarray(row(x)).reshape(3, 3, D)  # [block_row, block_col]
    np.testing.assert_allclose(a.transpose(1, 0, 2), b, atol=1e-6)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("ptype", MERGING + ("mlp2x_gelu", "linear"))
def test_names_and_bitwise_roundtrip(ptype):
    cfg, ref, model = build(ptype, "row_major", 5)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(mapping.expected_names(cfg, "mm_projector")) == sorted(sd)
    out = mapping.export_state_dict(model, "mm_projector")
    assert sorted(out) == sorted(sd)
    for k, v in out.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    for k in sd:
        target = mapping.resolve(cfg, "mm_projector", k)
        assert mapping.hf_name(cfg, "mm_projector", target.path, target.layer) == k


def test_vila_slot_names():
    """Slot numbers of longvila.md §3.2 (nn.Sequential positions in VILA's base_projector.py)."""
    names = {
        t: sorted(mapping.expected_names(make_cfg(t, "row_major", 4), "mm_projector"))
        for t in MERGING + ("mlp2x_gelu", "linear")
    }
    slots = {t: sorted({n.split(".")[1] for n in v if n.count(".") == 2}) for t, v in names.items()}
    assert slots["mlp_downsample"] == slots["mlp_downsample_2x2_fix"] == ["1", "2", "4"]
    assert slots["mlp_downsample_3x3_fix"] == ["1", "2", "4", "5", "7"]
    assert slots["mlp2x_gelu"] == ["0", "2"]
    assert names["linear"] == ["layers.bias", "layers.weight"]
    cfg = make_cfg("mlp_downsample", "row_major", 4)
    assert mapping.resolve(cfg, "mm_projector", "layers.3.weight") is None
    assert mapping.resolve(cfg, "mm_projector", "layers.2.weight").transform == "transpose"


def test_wrong_shape_is_named():
    cfg, ref, model = build("mlp_downsample", "row_major", 4)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    sd["layers.2.weight"] = sd["layers.2.weight"][:, :-1]
    with pytest.raises(ValueError, match="layers.2.weight"):
        mapping.load_state_dict(model, "mm_projector", sd)
