"""bench/gpu_fused.py on CPU: the zigzag schedule, the fused-block emulation's forward (LSE
merge) and custom_vjp backward against dense causal attention, and the script end to end.

The cuDNN kernel itself needs a GPU; ``--fused xla`` runs the same code path with
``jax.nn.dot_product_attention``'s XLA implementation behind the same API and residual.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.core.attention import dense_attention

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_fused.py"


@pytest.fixture(scope="module")
def gf():
    spec = importlib.util.spec_from_file_location("gpu_fused", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dense_causal(q, k, v, scale):
    """The project's dense reference (materialised scores) on one causal segment."""
    b, t = q.shape[:2]
    one, pos = jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t))
    return dense_attention(q, k, v, segment_ids=one, positions=pos, causal=True, scale=scale)


@pytest.mark.parametrize("ring", [1, 2, 4, 8])
def test_schedule_covers_every_causal_pair_once(gf, ring):
    blocks = gf.schedule(ring)
    pairs = [(qi, ki) for qi, ki, _ in blocks]
    n = 2 * ring
    assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1)]
    assert all(causal == (qi == ki) for qi, ki, causal in blocks)
    # balance: every rank, every step, does 2 chunk-blocks of work (a causal diagonal one is
    # half a block); ranks list 3 blocks for step 0, then 2 per step
    assert len(blocks) == ring * (2 * ring + 1)
    work = lambda bs: sum(0.5 if causal else 1.0 for _, _, causal in bs)  # noqa: E731
    for r in range(ring):
        mine = blocks[r * (2 * ring + 1) : (r + 1) * (2 * ring + 1)]
        steps = [mine[:3]] + [mine[i : i + 2] for i in range(3, len(mine), 2)]
        assert [work(st) for st in steps] == [2.0] * ring, f"rank {r}"


@pytest.mark.parametrize(
    "ring,hkv,fused,kv_chunk",
    [(2, 4, "xla", 1024), (4, 2, "xla", 1024), (2, 1, "xla", 1024), (2, 2, None, 8)],
    ids=["mha-fused", "gqa-fused", "mqa-fused", "gqa-xla-chunked"],
)
def test_emulation_matches_dense(gf, ring, hkv, fused, kv_chunk):
    b, s, h, d = 2, 64, 4, 16
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    ct = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
    scale = d**-0.5
    attn = gf.make_zigzag(ring, scale, kv_chunk, fused=fused)

    @jax.jit
    def both(q, k, v, ct):
        out, vjp = jax.vjp(attn, q, k, v)
        ref, ref_vjp = jax.vjp(lambda q, k, v: dense_causal(q, k, v, scale), q, k, v)
        return out, ref, vjp(ct), ref_vjp(ct)

    out, ref, grads, ref_grads = both(q, k, v, ct)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        rel = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert rel <= 1e-4, f"d{name} max relative error {rel:.2e}"


def test_fused_block_lse_is_the_block_logsumexp(gf):
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (1, 8, 4, 8), jnp.float32)
    k = jax.random.normal(keys[1], (1, 8, 2, 8), jnp.float32)
    v = jax.random.normal(keys[2], (1, 8, 2, 8), jnp.float32)
    o, lse = jax.jit(gf.fused_block, static_argnums=(3, 4, 5))(q, k, v, False, 0.5, "xla")
    q, k = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    ref = np.log(np.exp(scores).sum(-1))
    np.testing.assert_allclose(np.asarray(lse), ref, rtol=0, atol=1e-5)
    assert o.dtype == lse.dtype == jnp.float32
    with pytest.raises(ValueError, match="--fused"):
        gf.fused_block(q, k, v, False, 0.5, "flash")


def test_script_end_to_end_on_cpu(gf, tmp_path):
    out = tmp_path / "r" / "gpu_fused.json"
    argv = "--fused xla --dtype float32 --seq 64 --heads 4 --kv-heads 2 --dim 8 --ring 1"
    gf.main([*argv.split(), "--repeats", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["device_kind"] and record["args"]["fused"] == "xla"
    rows = {r["impl"]: r for r in record["rows"]}
    assert set(rows) == {
        "xla full causal",
        "zigzag emulation, xla blocks",
        "zigzag emulation, XLA blocks",
    }
    for row in rows.values():
        assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0
        assert row["fwd_max_abs_err_vs_full"] <= 1e-5
        assert max(row["grad_max_rel_err_vs_full"]) <= 1e-4


def test_script_refuses_cudnn_without_gpu_and_bad_shapes(gf, tmp_path):
    with pytest.raises(SystemExit, match="--fused xla"):
        gf.main(["--seq", "64", "--ring", "2", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
    for bad in (["--seq", "60", "--ring", "4"], ["--heads", "6", "--kv-heads", "4"]):
        with pytest.raises(SystemExit) as e:
            gf.parse_args(bad)
        assert e.value.code == 2
