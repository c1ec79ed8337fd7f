"""Fused flash-attention block backward in Pallas: a dK/dV kernel and a dQ kernel.

``pallas_backward`` has exactly the contract of ``ring_kernels.chunked_backward``: it takes
the *final* (global) LSE of the queries, already passed through ``safe_lse`` (rows without a
visible key carry a huge positive value, so their probabilities are exactly 0), and
delta = rowsum(dO * O), as ring-flash-attention does, and returns this block's fp32 dQ^T, dK
and dV without the softmax scale on dQ^T and dK (the ring applies it once to the sums).

Both kernels recompute P = exp(scale * Q K^T - lse) tile by tile; nothing score-sized reaches
memory. Two kernels instead of one fused kernel, because a single pass would have to add dQ
tiles from many programs into one buffer (atomics, Triton-only and non-deterministic):

  dK/dV: a grid program owns one KV tile of one KV head and loops over every query head of its
         group and every query tile, on transposed scores S^T [bkv, bq] so that
         dV += P^T dO and dK += dS^T Q come out in K's layout (GQA sums over the group here);
  dQ:    a grid program owns one query tile of one query head and loops over the KV tiles,
         dQ += dS K.

with dS = P * (dO V^T - delta). Operands stay in their dtype (bf16 on the GPU path) and every
dot accumulates in fp32, as the XLA kernel does. Tiles that cannot hold a visible pair are
skipped from segment / position ranges (``pallas_blocks.tiles_may_attend``); padding, head-dim
padding and tile choice are those of ``pallas_blocks``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longvila_jax.core.attention import MASK_VALUE
from longvila_jax.parallel.block_kernel import interpret_pallas
from longvila_jax.parallel.pallas_blocks import (
    Tiles,
    align_varying,
    compiler_params,
    dot,
    fit_tile,
    head_dim_padded,
    out_struct,
    pad_to,
    round_up,
    tile_ranges,
    tiles_may_attend,
    visible,
)

# dK/dV keeps two [bkv, d] fp32 accumulators and walks short query tiles; dQ the reverse
# (the FlashAttention-2 Triton tutorial's shape). All powers of two, so one padding fits both.
DKV_TILES = Tiles(q=32, kv=64)
DQ_TILES = Tiles(q=64, kv=32)


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref,
                q_position_ref, kv_position_ref, dk_ref, dv_ref, *, causal: bool, scale: float,
                block_q: int):  # fmt: skip
    """One KV tile [bkv, d] against every query tile of every query head of its group
    (q / do refs [g, tq, d], lse / delta refs [g, tq])."""
    k, v = k_ref[...], v_ref[...]
    kv_segment_ids, kv_positions = kv_segment_ref[...], kv_position_ref[...]
    kv_ranges = tile_ranges(kv_segment_ids, kv_positions)
    group, tq = lse_ref.shape

    def q_tile(head, i, carry):
        rows = pl.ds(i * block_q, block_q)
        q_segment_ids, q_positions = q_segment_ref[rows], q_position_ref[rows]

        def attend(carry):
            dk, dv = carry
            q, do = q_ref[head, rows, :], do_ref[head, rows, :]
            lse, delta = lse_ref[head, rows], delta_ref[head, rows]
            s_t = dot(k, q, (1, 1)) * scale  # [bkv, bq] fp32
            seen = visible(
                q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, kv_major=True
            )
            p_t = jnp.exp(jnp.where(seen, s_t, MASK_VALUE) - lse[None, :])
            dp_t = dot(v, do, (1, 1))
            ds_t = p_t * (dp_t - delta[None, :])
            dv = dv + dot(p_t.astype(do.dtype), do, (1, 0))
            dk = dk + dot(ds_t.astype(q.dtype), q, (1, 0))
            return dk, dv

        may = tiles_may_attend(tile_ranges(q_segment_ids, q_positions), kv_ranges, causal)
        return jax.lax.cond(may, attend, lambda carry: carry, carry)

    def head_loop(head, carry):
        return jax.lax.fori_loop(0, tq // block_q, functools.partial(q_tile, head), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head_loop, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref,
               q_position_ref, kv_position_ref, dq_ref, *, causal: bool, scale: float,
               block_kv: int):  # fmt: skip
    """One query tile [bq, d] against every KV tile of its KV head (refs [tk, d])."""
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_segment_ids, q_positions = q_segment_ref[...], q_position_ref[...]
    q_ranges = tile_ranges(q_segment_ids, q_positions)

    def kv_tile(j, dq):
        cols = pl.ds(j * block_kv, block_kv)
        kv_segment_ids, kv_positions = kv_segment_ref[cols], kv_position_ref[cols]

        def attend(dq):
            k, v = k_ref[cols, :], v_ref[cols, :]
            s = dot(q, k, (1, 1)) * scale  # [bq, bkv] fp32
            seen = visible(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)
            p = jnp.exp(jnp.where(seen, s, MASK_VALUE) - lse[:, None])
            ds = p * (dot(do, v, (1, 1)) - delta[:, None])
            return dq + dot(ds.astype(k.dtype), k, (1, 0))

        may = tiles_may_attend(q_ranges, tile_ranges(kv_segment_ids, kv_positions), causal)
        return jax.lax.cond(may, attend, lambda dq: dq, dq)

    start = jnp.zeros(q.shape, jnp.float32)
    dq_ref[...] = jax.lax.fori_loop(0, k_ref.shape[0] // block_kv, kv_tile, start)


def pallas_backward(qh, qT, doh, doT, lse, delta, kh, vh,
                    q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                    causal: bool, scale: float, kv_chunk: int | None = None,
                    interpret: bool | None = None, dkv_tiles: Tiles = DKV_TILES,
                    dq_tiles: Tiles = DQ_TILES):  # fmt: skip
    """One block's backward as two fused Pallas kernels; ``chunked_backward``'s contract.

    Args:
      qh, doh: [b, hkv, g, tq, d]; qT, doT: [b, hkv, d, g, tq], the XLA kernel's transposed
        operands (unused: the kernels read tiles of qh / doh and transpose in registers).
      lse: [b, hkv, g, tq] fp32 final LSE after ``safe_lse``; delta: [b, hkv, g, tq] fp32
        rowsum(dO * O); kh, vh: [b, hkv, tk, d]; segment ids / positions as ``pallas_forward``.
      causal, scale, kv_chunk, interpret: as ``pallas_forward``.
      dkv_tiles, dq_tiles: tile sizes of the two kernels.

    Returns:
      dqT: [b, hkv, d, g, tq], dk, dv: [b, hkv, tk, d], fp32; dqT and dk lack the factor
      ``scale`` (applied once by the caller to the sums over blocks).
    """
    del qT, doT
    interpret = interpret_pallas(interpret)
    b, hkv, g, tq, d = qh.shape
    tk = kh.shape[2]
    dkv_q, dq_q = fit_tile(dkv_tiles.q, tq), fit_tile(dq_tiles.q, tq)
    dkv_kv, dq_kv = fit_tile(dkv_tiles.kv, tk, kv_chunk), fit_tile(dq_tiles.kv, tk, kv_chunk)
    # Tiles are powers of two, so a multiple of the larger one is a multiple of both.
    tq_pad, tk_pad = round_up(tq, max(dkv_q, dq_q)), round_up(tk, max(dkv_kv, dq_kv))
    d_pad = head_dim_padded(d)
    # Padded query rows have segment id 0, so their P is 0 whatever lse / delta hold.
    qh, doh = (pad_to(pad_to(x, 3, tq_pad), 4, d_pad) for x in (qh, doh))
    lse, delta = (pad_to(x.astype(jnp.float32), 3, tq_pad) for x in (lse, delta))
    kh, vh = (pad_to(pad_to(x, 2, tk_pad), 3, d_pad) for x in (kh, vh))
    q_meta = [pad_to(x.astype(jnp.int32), 1, tq_pad) for x in (q_segment_ids, q_positions)]
    kv_meta = [pad_to(x.astype(jnp.int32), 1, tk_pad) for x in (kv_segment_ids, kv_positions)]
    operands = align_varying(
        qh, doh, lse, delta, kh, vh, q_meta[0], kv_meta[0], q_meta[1], kv_meta[1]
    )
    kv_shape = out_struct((b, hkv, tk_pad, d_pad), jnp.float32, operands[0])

    # dK/dV: grid (batch, KV head, KV tile); the query side of the whole group is visible.
    group_q = pl.BlockSpec((None, None, g, tq_pad, d_pad), lambda i, k, t: (i, k, 0, 0, 0))
    group_rows = pl.BlockSpec((None, None, g, tq_pad), lambda i, k, t: (i, k, 0, 0))
    kv_tile = pl.BlockSpec((None, None, dkv_kv, d_pad), lambda i, k, t: (i, k, t, 0))
    q_meta_all = pl.BlockSpec((None, tq_pad), lambda i, k, t: (i, 0))
    kv_meta_tile = pl.BlockSpec((None, dkv_kv), lambda i, k, t: (i, t))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, causal=causal, scale=scale, block_q=dkv_q),
        grid=(b, hkv, tk_pad // dkv_kv),
        in_specs=[group_q, group_q, group_rows, group_rows, kv_tile, kv_tile]
        + [q_meta_all, kv_meta_tile, q_meta_all, kv_meta_tile],
        out_specs=[kv_tile, kv_tile],
        out_shape=[kv_shape, kv_shape],
        interpret=interpret,
        compiler_params=compiler_params(dkv_tiles, interpret),
        name="ring_block_backward_dkv",
    )(*operands)

    # dQ: grid (batch, KV head, query head of the group, query tile).
    q_tile = pl.BlockSpec((None, None, None, dq_q, d_pad), lambda i, k, h, t: (i, k, h, t, 0))
    row_tile = pl.BlockSpec((None, None, None, dq_q), lambda i, k, h, t: (i, k, h, t))
    kv_all = pl.BlockSpec((None, None, tk_pad, d_pad), lambda i, k, h, t: (i, k, 0, 0))
    q_meta_tile = pl.BlockSpec((None, dq_q), lambda i, k, h, t: (i, t))
    kv_meta_all = pl.BlockSpec((None, tk_pad), lambda i, k, h, t: (i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, scale=scale, block_kv=dq_kv),
        grid=(b, hkv, g, tq_pad // dq_q),
        in_specs=[q_tile, q_tile, row_tile, row_tile, kv_all, kv_all]
        + [q_meta_tile, kv_meta_all, q_meta_tile, kv_meta_all],
        out_specs=q_tile,
        out_shape=out_struct((b, hkv, g, tq_pad, d_pad), jnp.float32, operands[0]),
        interpret=interpret,
        compiler_params=compiler_params(dq_tiles, interpret),
        name="ring_block_backward_dq",
    )(*operands)
    dq_t = dq[..., :tq, :d].transpose(0, 1, 4, 2, 3)  # [b, hkv, d, g, tq]: the ring's dQ^T
    return dq_t, dk[:, :, :tk, :d], dv[:, :, :tk, :d]
