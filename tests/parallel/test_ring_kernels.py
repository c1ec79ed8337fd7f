"""The ring's block kernels on their own (``ring_kernels.block_forward`` / ``block_backward``, the
natural-layout entry points the decode path and the GPU bench use) vs the dense reference.

One block = a q set and a different, overlapping kv set of a permuted, packed sequence with
padding, so the mask comes only from segment ids and positions; GQA (4 query heads per KV head);
dense and KV-chunked (flash) paths; causal and bidirectional. The block's own LSE is final, so
``block_backward`` must reproduce autodiff of dense attention exactly.
Tolerances (issue 3, as the ring tests): forward max abs error <= 1e-5, gradients max relative
error <= 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.mmsp_cases import fast_jit, max_abs, max_rel, packed_inputs

from longvila_jax.core.attention import dense_attention_with_lse
from longvila_jax.parallel.ring_kernels import block_backward, block_forward

T, H, HKV, D = 32, 8, 2, 8
SCALE = D**-0.5


def _block_inputs():
    x = packed_inputs(4, T, H, HKV, D, seed=5)
    perm = np.random.default_rng(3).permutation(T)
    qi, ki = perm[:16], perm[8:]  # 16 queries, 24 keys, 8 tokens shared
    q_side = [x["q"][:, qi], x["segment_ids"][:, qi], x["positions"][:, qi]]
    kv_side = [x["k"][:, ki], x["v"][:, ki], x["segment_ids"][:, ki], x["positions"][:, ki]]
    do = np.random.default_rng(4).standard_normal(q_side[0].shape, dtype=np.float32)
    return q_side, kv_side, do


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_chunk", [None, 8])
def test_block_kernels_match_dense_autodiff(causal, kv_chunk):
    (q, q_seg, q_pos), (k, v, k_seg, k_pos), do = _block_inputs()

    def dense(q, k, v):
        return dense_attention_with_lse(
            q, k, v, segment_ids=q_seg, positions=q_pos, causal=causal, scale=SCALE,
            kv_segment_ids=k_seg, kv_positions=k_pos,
        )  # fmt: skip

    @fast_jit
    def reference(q, k, v, do):
        (out, lse), vjp = jax.vjp(dense, q, k, v)
        return out, lse, vjp((do, jnp.zeros_like(lse)))

    @fast_jit
    def ours(q, k, v, do):
        kw = dict(causal=causal, scale=SCALE, kv_chunk=kv_chunk)
        o, lse = block_forward(q, k, v, q_seg, k_seg, q_pos, k_pos, **kw)
        delta = jnp.einsum("bqhd,bqhd->bhq", do, o)
        grads = block_backward(q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos, **kw)
        return o, lse, grads

    r_out, r_lse, r_grads = reference(q, k, v, do)
    out, lse, grads = ours(q, k, v, do)
    tag = f"causal={causal} kv_chunk={kv_chunk}"
    assert max_abs(out, r_out) <= 1e-5, f"{tag}: forward error {max_abs(out, r_out)}"
    seen = np.asarray(r_lse) > -1e30  # rows with a visible key (others: both very negative)
    assert seen.any() and not seen.all(), tag  # the case has both kinds of rows
    assert max_abs(np.where(seen, lse, 0), np.where(seen, r_lse, 0)) <= 1e-5, tag
    assert np.all(np.asarray(lse)[~seen] < -1e30), tag
    for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), f"{tag}: {name} not finite"
        assert max_rel(g, rg) <= 1e-4, f"{tag}: {name} rel error {max_rel(g, rg)}"
