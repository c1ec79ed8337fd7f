"""The fused Pallas block kernels (``pallas_blocks`` / ``pallas_backward``, in the interpreter on
CPU) against the XLA block kernels and against autodiff of dense attention; the
``block_kernel`` knob.

One block = a query set and a key set of a packed sequence: row 0 packs three samples whose
boundaries (tokens 21 and 58) fall inside 16-token tiles, with positions restarting per sample;
row 1 two samples and a padded tail; row 2 is all padding (no visible key anywhere). Three
kinds of block, as the zigzag ring produces them: causal-diagonal (the queries are the keys,
contiguous positions), permuted causal (non-contiguous positions, 40 queries vs 56 keys with 16
shared), and full (bidirectional). Lengths 40 and 56 are not multiples of the 16-token tiles,
and the head dimension 8 is padded to 16 inside the wrapper.

Tolerances (issue 3, never loosened): fp32 forward max abs error <= 1e-5 (o and LSE of rows
with a visible key); gradients max relative error <= 1e-4 (max abs error / max |reference|).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.mmsp_cases import fast_jit, max_abs, max_rel

from longvila_jax.config.base import ConfigError, from_dict
from longvila_jax.core.attention import dense_attention_with_lse
from longvila_jax.parallel.block_kernel import resolve_block_kernel
from longvila_jax.parallel.mesh import MeshConfig, load_mesh_config
from longvila_jax.parallel.pallas_backward import pallas_backward
from longvila_jax.parallel.pallas_blocks import Tiles, fit_tile, pallas_forward
from longvila_jax.parallel.ring_kernels import (
    block_backward,
    block_forward,
    block_kernels,
    from_heads,
    heads_t,
    safe_lse,
    to_heads,
)

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
T_ALL, D = 96, 8
SCALE = D**-0.5
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
SMALL = Tiles(q=16, kv=16)


def _sequence(h: int, hkv: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Natural-order q/k/v/segment ids/positions of the packed rows (module docstring)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, T_ALL, h, D)).astype(dtype)
    k = rng.standard_normal((3, T_ALL, hkv, D)).astype(dtype)
    v = rng.standard_normal((3, T_ALL, hkv, D)).astype(dtype)
    seg = np.zeros((3, T_ALL), np.int32)
    seg[0, :21], seg[0, 21:58], seg[0, 58:] = 1, 2, 3
    seg[1, :37], seg[1, 37:80] = 1, 2
    pos = np.tile(np.arange(T_ALL, dtype=np.int32), (3, 1))
    for s in (1, 2, 3):  # row 0: positions restart at every sample
        idx = np.nonzero(seg[0] == s)[0]
        pos[0, idx] = np.arange(len(idx))
    return {"q": q, "k": k, "v": v, "seg": seg, "pos": pos}


def _block(case: str, x: dict) -> tuple[list, list, bool]:
    """(q side [q, seg, pos], kv side [k, v, seg, pos], causal) of one block kind."""
    if case == "diagonal":
        qi = ki = np.arange(8, 48)
    else:
        perm = np.random.default_rng(3).permutation(T_ALL)
        qi, ki = perm[:40], perm[24:80]
    q_side = [x["q"][:, qi], x["seg"][:, qi], x["pos"][:, qi]]
    kv_side = [x["k"][:, ki], x["v"][:, ki], x["seg"][:, ki], x["pos"][:, ki]]
    return q_side, kv_side, case != "full"


def _run(block_kernel: str, q_side, kv_side, do, causal: bool, tiles: Tiles | None):
    """o [b, tq, h, d], lse [b, h, tq] and (dq, dk, dv) in the natural layout.

    Default tiles go through the natural-layout entry points (``block_forward`` /
    ``block_backward`` with ``block_kernel``); explicit Pallas tiles call the heads-major
    kernels directly, as the ring does (``ring_kernels.block_kernels``).
    """
    q, q_seg, q_pos = q_side
    k, v, k_seg, k_pos = kv_side
    kw = dict(causal=causal, scale=SCALE)

    @fast_jit
    def natural(q, k, v, do):
        o, lse = block_forward(q, k, v, q_seg, k_seg, q_pos, k_pos, block_kernel=block_kernel, **kw)
        delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o)
        grads = block_backward(
            q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos, block_kernel=block_kernel, **kw
        )
        return o, lse, grads

    @fast_jit
    def heads_major(q, k, v, do):
        hkv = k.shape[2]
        qh, doh = to_heads(q, hkv), to_heads(do, hkv)
        kh, vh = (to_heads(x, hkv)[:, :, 0] for x in (k, v))
        forward, backward = block_kernels(block_kernel)
        if block_kernel == "pallas":
            forward = functools.partial(pallas_forward, tiles=tiles)
            backward = functools.partial(pallas_backward, dkv_tiles=tiles, dq_tiles=tiles)
        o, lse = forward(qh, kh, vh, q_seg, k_seg, q_pos, k_pos, **kw)
        delta = jnp.einsum("bkgqd,bkgqd->bkgq", doh.astype(jnp.float32), o)
        dq_t, dk, dv = backward(
            qh, heads_t(qh), doh, heads_t(doh), safe_lse(lse), delta, kh, vh,
            q_seg, k_seg, q_pos, k_pos, **kw,
        )  # fmt: skip
        dq = from_heads(dq_t.transpose(0, 1, 3, 4, 2)) * SCALE
        grads = (dq, dk.transpose(0, 2, 1, 3) * SCALE, dv.transpose(0, 2, 1, 3))
        return from_heads(o), lse.reshape(q.shape[0], q.shape[2], q.shape[1]), grads

    return (natural if tiles is None else heads_major)(q, k, v, do)


def _dense(q_side, kv_side, do, causal: bool):
    """Dense attention of the block, its LSE, and autodiff (dq, dk, dv) of sum(out * do)."""
    q, q_seg, q_pos = q_side
    k, v, k_seg, k_pos = kv_side

    def dense(q, k, v):
        return dense_attention_with_lse(
            q, k, v, segment_ids=q_seg, positions=q_pos, causal=causal, scale=SCALE,
            kv_segment_ids=k_seg, kv_positions=k_pos,
        )  # fmt: skip

    @fast_jit
    def fn(q, k, v, do):
        (out, lse), vjp = jax.vjp(dense, q, k, v)
        return out, lse, vjp((do, jnp.zeros_like(lse)))

    return fn(q, k, v, do)


# Every block kind, every head layout; the last case keeps the default (GPU) tiles, which the
# 40 / 56-token block pads to one 64-token tile.
CASES = [
    ("diagonal", "gqa", SMALL),
    ("permuted", "mha", SMALL),
    ("full", "mqa", SMALL),
    ("permuted", "gqa", None),
]


@pytest.mark.parametrize("case,kind,tiles", CASES)
def test_pallas_block_matches_xla_and_dense(case, kind, tiles):
    x = _sequence(*HEADS[kind])
    q_side, kv_side, causal = _block(case, x)
    do = np.random.default_rng(4).standard_normal(q_side[0].shape).astype(np.float32)
    got = _run("pallas", q_side, kv_side, do, causal, tiles)
    refs = {
        "xla": _run("xla", q_side, kv_side, do, causal, tiles),
        "dense": _dense(q_side, kv_side, do, causal),
    }
    o, lse, grads = got
    seen = np.asarray(refs["dense"][1]) > -1e30  # rows with a visible key
    assert seen.any() and not seen.all(), "the block needs both kinds of rows"
    assert np.all(np.asarray(lse)[~seen] < -1e30) and np.all(
        np.asarray(o)[~seen.swapaxes(1, 2)] == 0
    )
    for name, (r_o, r_lse, r_grads) in refs.items():
        tag = f"{case} {kind} tiles={tiles} vs {name}"
        assert max_abs(o, r_o) <= FWD_TOL, f"{tag}: o error {max_abs(o, r_o)}"
        lse_err = max_abs(np.where(seen, lse, 0), np.where(seen, r_lse, 0))
        grad_errs = [max_rel(g, rg) for g, rg in zip(grads, r_grads, strict=True)]
        print(tag, "o abs", max_abs(o, r_o), "lse abs", lse_err, "dq/dk/dv rel", grad_errs)
        assert lse_err <= FWD_TOL, f"{tag}: lse error {lse_err}"
        for g_name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
            assert np.all(np.isfinite(np.asarray(g))), f"{tag}: {g_name} not finite"
            assert max_rel(g, rg) <= GRAD_TOL, f"{tag}: {g_name} rel error {max_rel(g, rg)}"


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 q/k/v/dO: o, LSE and gradients vs an fp32 dense reference on the same bf16 values.

    Bound: the kernels round only matmul operands to bf16 (P before P V, dS before dS K and
    dS^T Q; relative error 2^-9 each) and accumulate in fp32, so the output is off by a few
    bf16 ulps of its largest value: |o| <= max|v| < 5 gives 2^-8 * 5 ~ 2e-2 absolute. The LSE
    sees no rounded operand (fp32 scores of exact bf16 values): 1e-5, as fp32. Gradients: 1e-2
    relative (a few ulps of 2^-9, summed over <= 56 keys with random signs).
    """
    x = _sequence(*HEADS["gqa"], dtype=jnp.bfloat16)
    q_side, kv_side, causal = _block("permuted", x)
    do = np.random.default_rng(4).standard_normal(q_side[0].shape).astype(jnp.bfloat16)
    as_f32 = lambda xs: [np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else a for a in xs]  # noqa: E731
    r_o, r_lse, r_grads = _dense(
        as_f32(q_side), as_f32(kv_side), np.asarray(do, np.float32), causal
    )
    seen = np.asarray(r_lse) > -1e30
    o, lse, grads = _run("pallas", q_side, kv_side, do, causal, SMALL)
    assert o.dtype == jnp.float32 and lse.dtype == jnp.float32  # fp32 o / LSE
    assert all(g.dtype == jnp.float32 for g in grads)
    o_err = max_abs(o, r_o)
    lse_err = max_abs(np.where(seen, lse, 0), np.where(seen, r_lse, 0))
    grad_err = max(max_rel(g, rg) for g, rg in zip(grads, r_grads, strict=True))
    print("bf16 errors: o abs", o_err, "lse abs", lse_err, "grad rel", grad_err)
    assert o_err <= 2e-2 and lse_err <= 1e-5 and grad_err <= 1e-2
    assert o_err > 1e-4, "bf16 rounding of P must show: the check could not fail"


def test_tiles_are_powers_of_two_and_fit_the_block():
    assert fit_tile(64, 40) == 64 and fit_tile(64, 8) == 16  # >= 16, <= the padded length
    assert fit_tile(64, 300, kv_chunk=48) == 32  # kv_chunk caps at a power of two
    assert fit_tile(64, 300, kv_chunk=512) == 64
    for bad in (8, 48):
        with pytest.raises(ValueError, match="Tiles.q"):
            Tiles(q=bad)


def test_block_kernel_knob_resolves_and_validates():
    assert resolve_block_kernel("auto", backend="gpu") == "pallas"
    assert resolve_block_kernel("auto", backend="cuda") == "pallas"
    assert resolve_block_kernel("auto", backend="cpu") == "xla"
    assert resolve_block_kernel("auto", backend="tpu") == "xla"
    assert resolve_block_kernel("pallas", backend="cpu") == "pallas"  # interpreted on CPU
    assert resolve_block_kernel("xla", backend="gpu") == "xla"
    assert resolve_block_kernel("auto") == "xla"  # these tests run on CPU
    with pytest.raises(ValueError, match="block_kernel"):
        resolve_block_kernel("cudnn")
    # The mesh file's field: default auto, bad values rejected naming the field.
    assert MeshConfig().block_kernel == "auto"
    assert from_dict(MeshConfig, {"block_kernel": "pallas"}).block_kernel == "pallas"
    for bad in ("cudnn", "Pallas", 3):
        with pytest.raises(ConfigError) as e:
            from_dict(MeshConfig, {"block_kernel": bad})
        assert e.value.field == "block_kernel"
    with pytest.raises(ConfigError) as e:
        MeshConfig(block_kernel="triton")
    assert e.value.field == "block_kernel" and "triton" in str(e.value)
    mesh_file = Path(__file__).resolve().parents[2] / "configs/mesh/cpu8_r2u4.yaml"
    assert load_mesh_config(mesh_file, ["block_kernel=pallas"]).block_kernel == "pallas"
    with pytest.raises(ConfigError) as e:
        load_mesh_config(mesh_file, ["block_kernel=fast"])
    assert e.value.field == "block_kernel"
