"""Ulysses head limits: KV-head replication when U does not divide the KV heads (Qwen2-7B's 28
query / 4 KV heads with U = 7), forward and gradients vs dense (replica gradients summed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.mmsp_cases import fast_jit, max_abs, max_rel, packed_inputs

from longvila_jax.core.attention import dense_attention
from longvila_jax.parallel.attention import mmsp_attention
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.ulysses import kv_replication


def test_kv_replication_factors():
    assert kv_replication(32, 8, 4) == 1  # U | n_kv: KV heads split as they are
    assert kv_replication(32, 8, 8) == 1
    assert kv_replication(28, 4, 4) == 1
    assert kv_replication(28, 4, 7) == 7  # lcm(4, 7) = 28 heads
    assert kv_replication(28, 4, 14) == 7
    assert kv_replication(28, 4, 28) == 7  # U % n_kv == 0: U / n_kv
    assert kv_replication(8, 1, 8) == 8  # MQA
    assert kv_replication(8, 4, 8) == 2
    with pytest.raises(ValueError, match="must divide num_heads 28"):
        kv_replication(28, 4, 8)


@pytest.mark.slow
def test_qwen2_heads_with_ulysses_seven():
    """28 q / 4 kv heads, U = 7 on 7 devices: KV expanded to 28 heads inside the call."""
    h, hkv, d, t = 28, 4, 4, 28
    x = packed_inputs(2, t, h, hkv, d, seed=2)
    mesh = make_mesh(MeshConfig(ulysses=7), jax.devices()[:7])
    ct = np.random.default_rng(1).standard_normal((2, t, h, d), dtype=np.float32)
    seg, pos = x["segment_ids"], x["positions"]

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * ct), out

    def ours(q, k, v):
        return mmsp_attention(q, k, v, mesh, segment_ids=seg, positions=pos, causal=True)

    def ref(q, k, v):
        return dense_attention(q, k, v, segment_ids=seg, positions=pos, causal=True, scale=d**-0.5)

    grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
    g, out = fast_jit(lambda *a: grad(ours, *a))(x["q"], x["k"], x["v"])
    rg, rout = grad(ref, x["q"], x["k"], x["v"])
    assert max_abs(out, rout) <= 1e-5
    for name, a, b in zip(("dq", "dk", "dv"), g, rg, strict=True):
        assert a.shape == b.shape
        assert max_rel(a, b) <= 1e-4, name
