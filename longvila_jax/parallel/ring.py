"""Zigzag ring attention over one mesh axis, for use inside ``jax.shard_map``.

Each ring rank holds one sequence block (q, k, v, segment ids, positions). KV blocks travel
r -> r+1 with ``ppermute`` (the next hop is issued before the step's compute so XLA can overlap
it); partial results merge with an fp32 online softmax (o and LSE in fp32). The backward is a
``jax.custom_vjp`` that recomputes blocks and rotates fp32 dK/dV accumulators with a one-hop
lag, so autodiff never goes through the ring loop.

Work per step is chosen from the data, not from chunk arithmetic: the local block is split into
a front and a back half and, from min/max ranges of segment ids and positions, each step picks
the cheapest of five ``lax.switch`` branches (``select_mode``) that covers every (q half,
kv half) quarter that may hold a visible pair:

  SKIP      nothing visible;
  FULL      all four quarters;
  KV_FRONT  all queries vs the front kv half;
  Q_BACK    the back query half vs all kv;
  DIAG      all but (front q, back kv): front q vs front kv, back q vs all kv (3/4 of FULL).

Under the zigzag layout (rank r holds chunks r and 2R-1-r, see ``layouts.py``) this reproduces
the dual-chunk schedule (step 0 DIAG, j < r KV_FRONT, j > r Q_BACK: every rank does half a
block on every later step), while the mask itself always comes from the positions and segment
ids carried with the blocks, so any permutation of tokens and any packing is computed correctly.

Branches with two sub-blocks (FULL, DIAG) run them one after the other (``_in_sequence``), so
no step holds more than one [c, c/2] scores buffer: XLA would otherwise overlap them, and the
largest branch sets the temp memory of the whole program.

Layouts (see ``ring_kernels``): every score-sized tensor is made and consumed by plain row-major
matmuls; K/V and the dK/dV accumulators travel the ring as [b, hkv, c, d]; o / LSE and dQ^T
accumulate in the kernels' layouts and go back to [b, c, h, d] once at the end; the softmax
scale of dQ and dK is applied once, to the sums. Sub-blocks update only the rows they reach of
the local accumulators (no zero halves for o, LSE, dQ).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longvila_jax.core.attention import MASK_VALUE
from longvila_jax.parallel.ring_kernels import (
    block_backward,
    block_forward,
    chunked_backward,
    chunked_forward,
    from_heads,
    heads_t,
    merge,
    safe_lse,
    to_heads,
    varying,
)

__all__ = [
    "DIAG", "FULL", "KV_FRONT", "Q_BACK", "SKIP",
    "block_backward", "block_forward", "ring_attention_local", "select_mode",
]  # fmt: skip

SKIP, FULL, KV_FRONT, Q_BACK, DIAG = 0, 1, 2, 3, 4
_BIG = jnp.iinfo(jnp.int32).max


def _ranges(seg: jax.Array, pos: jax.Array) -> tuple[jax.Array, ...]:
    """Per-row [b] min/max segment id and min/max position over non-padding tokens."""
    valid = seg != 0
    return (
        jnp.min(jnp.where(valid, seg, _BIG), axis=1),
        jnp.max(jnp.where(valid, seg, -1), axis=1),
        jnp.min(jnp.where(valid, pos, _BIG), axis=1),
        jnp.max(jnp.where(valid, pos, -_BIG), axis=1),
    )


def _may_attend(qr: tuple[jax.Array, ...], kr: tuple[jax.Array, ...], causal: bool) -> jax.Array:
    """Scalar bool: some row may have a visible (q, kv) pair (a necessary condition)."""
    q_smin, q_smax, _, q_pmax = qr
    k_smin, k_smax, k_pmin, _ = kr
    ok = (q_smax >= k_smin) & (k_smax >= q_smin)  # false when either side is all padding
    if causal:
        ok &= k_pmin <= q_pmax
    return jnp.any(ok)


def select_mode(
    q_seg: jax.Array, q_pos: jax.Array, k_seg: jax.Array, k_pos: jax.Array, causal: bool
) -> jax.Array:
    """Picks SKIP / FULL / KV_FRONT / Q_BACK / DIAG for one (local q block, kv block) step.

    Args:
      q_seg, q_pos: [b, c] segment ids and positions of the local queries.
      k_seg, k_pos: [b, c] the same for the kv block of this step.
      causal: whether the causal mask applies.

    Returns:
      int32 scalar mode index: the cheapest branch covering every quarter that may attend.
    """
    h = q_seg.shape[1] // 2
    qf, qb = _ranges(q_seg[:, :h], q_pos[:, :h]), _ranges(q_seg[:, h:], q_pos[:, h:])
    kf, kb = _ranges(k_seg[:, :h], k_pos[:, :h]), _ranges(k_seg[:, h:], k_pos[:, h:])
    n_ff, n_fb = _may_attend(qf, kf, causal), _may_attend(qf, kb, causal)
    n_bf, n_bb = _may_attend(qb, kf, causal), _may_attend(qb, kb, causal)
    mode = jnp.where(n_fb, FULL, DIAG)
    mode = jnp.where(~(n_ff | n_fb), Q_BACK, mode)
    mode = jnp.where(~(n_fb | n_bb), KV_FRONT, mode)
    return jnp.where(~(n_ff | n_fb | n_bf | n_bb), SKIP, mode).astype(jnp.int32)


def _in_sequence(carry, *fns):
    """``fns[-1](...fns[0](carry))`` as a loop over a switch, so the sub-blocks run one after
    the other: XLA would otherwise interleave two independent sub-blocks and keep both score
    buffers live, and the largest branch sets every step's temp memory."""
    return jax.lax.fori_loop(0, len(fns), lambda i, c: jax.lax.switch(i, fns, c), carry)


def _switch(mode, block, start, half: int):
    """Runs the branch ``mode`` (SKIP / FULL / KV_FRONT / Q_BACK / DIAG) of one ring step.

    ``block(rows, cols)`` returns an ``acc -> acc`` update with the work of the local q rows
    ``rows`` against the kv rows ``cols`` (slices of the block); ``start`` is the accumulator
    the step begins from. Every branch keeps scores at most [c, c/2] (see ``_in_sequence``).
    """
    front, back, every = slice(None, half), slice(half, None), slice(None)
    branches = (
        lambda: start,  # SKIP
        lambda: _in_sequence(start, block(every, front), block(every, back)),  # FULL
        lambda: block(every, front)(start),  # KV_FRONT
        lambda: block(back, every)(start),  # Q_BACK
        lambda: _in_sequence(start, block(front, front), block(back, every)),  # DIAG
    )
    return jax.lax.switch(mode, branches)


def _fwd_step(qh, kv, q_seg, q_pos, meta, o, lse, causal, scale, kv_chunk):
    """One forward step: merges this kv block into the rows it reaches of the local fp32
    accumulators o [b, hkv, g, c, d] and lse [b, hkv, g, c]; returns them."""
    kh, vh = kv[0], kv[1]
    k_seg, k_pos = meta[0], meta[1]
    blk = functools.partial(chunked_forward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def block(rows, cols):
        def update(acc):
            o_b, lse_b = blk(
                qh[:, :, :, rows], kh[:, :, cols], vh[:, :, cols],
                q_seg[:, rows], k_seg[:, cols], q_pos[:, rows], k_pos[:, cols],
            )  # fmt: skip
            o_r, lse_r = merge(acc[0][:, :, :, rows], acc[1][..., rows], o_b, lse_b)
            return acc[0].at[:, :, :, rows].set(o_r), acc[1].at[..., rows].set(lse_r)

        return update

    mode = select_mode(q_seg, q_pos, k_seg, k_pos, causal)
    return _switch(mode, block, (o, lse), qh.shape[3] // 2)


def _shift(x, axis_name: str, ring_size: int):
    return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % ring_size) for i in range(ring_size)])


def _ring_forward(q, k, v, seg, pos, axis_name, ring_size, causal, scale, unroll, kv_chunk):
    """Returns o [b, c, h, d] in q's dtype and the final lse [b, hkv, g, c] fp32."""
    hkv = k.shape[2]
    qh = to_heads(q, hkv)
    kv = jnp.stack([to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0]])  # [2, b, hkv, c, d]
    meta = jnp.stack([seg, pos])
    # The carries vary over q's and kv's manual axes, like every branch's merged output.
    o = varying(varying(jnp.zeros(qh.shape, jnp.float32), qh), kv)
    lse = varying(varying(jnp.full(qh.shape[:-1], MASK_VALUE, jnp.float32), qh), kv)

    def step(kv, meta, o, lse, send):
        if send:  # issued before the compute that does not depend on it
            nxt = (_shift(kv, axis_name, ring_size), _shift(meta, axis_name, ring_size))
        else:
            nxt = (kv, meta)
        o, lse = _fwd_step(qh, kv, seg, pos, meta, o, lse, causal, scale, kv_chunk)
        return nxt[0], nxt[1], o, lse

    if ring_size > 1:  # steps 0..R-2 send the next block; the last step sends nothing

        def body(carry, _):
            return step(*carry, True), None

        (kv, meta, o, lse), _ = jax.lax.scan(
            body, (kv, meta, o, lse), None, length=ring_size - 1, unroll=unroll
        )
    kv, meta, o, lse = step(kv, meta, o, lse, False)
    return from_heads(o).astype(q.dtype), lse


def _bwd_step(qs, kv, q_seg, q_pos, meta, dqT, causal, scale, kv_chunk):
    """One backward step. ``qs`` = (qh, qT, doh, doT, lse, delta) of the local queries. Adds
    this kv block's dQ^T into the rows it reaches of ``dqT`` [b, hkv, d, g, c] and returns it
    with the block's own fp32 dK/dV [2, b, hkv, c, d] (zero where not reached), kept apart from
    the incoming dK/dV accumulator so that the compute need not wait for that hop."""
    qh, qT, doh, doT, lse, delta = qs
    kh, vh = kv[0], kv[1]
    k_seg, k_pos = meta[0], meta[1]
    blk = functools.partial(chunked_backward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def block(rows, cols):
        def update(acc):
            dq_b, dk, dv = blk(
                qh[:, :, :, rows], qT[..., rows], doh[:, :, :, rows], doT[..., rows],
                lse[..., rows], delta[..., rows], kh[:, :, cols], vh[:, :, cols],
                q_seg[:, rows], k_seg[:, cols], q_pos[:, rows], k_pos[:, cols],
            )  # fmt: skip
            dkv = acc[1].at[:, :, :, cols].add(jnp.stack([dk, dv]))
            return acc[0].at[..., rows].add(dq_b), dkv

        return update

    zeros = varying(varying(jnp.zeros(kv.shape, jnp.float32), kv), qh)
    mode = select_mode(q_seg, q_pos, k_seg, k_pos, causal)
    return _switch(mode, block, (dqT, zeros), qh.shape[3] // 2)


def _ring_backward(res, g, axis_name, ring_size, causal, scale, unroll, kv_chunk):
    q, k, v, seg, pos, out, lse = res
    hkv = k.shape[2]
    qh, doh = to_heads(q, hkv), to_heads(g.astype(q.dtype), hkv)
    f32 = jnp.float32
    # rowsum(dO * O) [b, hkv, g, c], once per call
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", doh.astype(f32), to_heads(out, hkv).astype(f32))
    qs = (qh, heads_t(qh), doh, heads_t(doh), safe_lse(lse), delta)
    kv = jnp.stack([to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0]])  # [2, b, hkv, c, d]
    meta = jnp.stack([seg, pos])
    dqT = varying(varying(jnp.zeros(heads_t(qh).shape, f32), qh), kv)

    def step(kv, meta, dqT, acc, send_kv, recv_acc):
        # Both hops are issued before this step's compute: the next KV block and the finished
        # dK/dV accumulator of the previous block (one-hop lag), which the neighbour needs now.
        nxt = (
            (_shift(kv, axis_name, ring_size), _shift(meta, axis_name, ring_size))
            if send_kv
            else (kv, meta)
        )
        acc_in = _shift(acc, axis_name, ring_size) if recv_acc else None
        dqT, dkv_b = _bwd_step(qs, kv, seg, pos, meta, dqT, causal, scale, kv_chunk)
        acc = dkv_b if acc_in is None else acc_in + dkv_b
        return nxt[0], nxt[1], dqT, acc

    acc = varying(varying(jnp.zeros(kv.shape, f32), kv), qh)
    kv, meta, dqT, acc = step(kv, meta, dqT, acc, ring_size > 1, False)
    if ring_size > 2:

        def body(carry, _):
            return step(*carry, True, True), None

        (kv, meta, dqT, acc), _ = jax.lax.scan(
            body, (kv, meta, dqT, acc), None, length=ring_size - 2, unroll=unroll
        )
    if ring_size > 1:
        kv, meta, dqT, acc = step(kv, meta, dqT, acc, False, True)
        acc = _shift(acc, axis_name, ring_size)  # the last hop brings dK/dV home
    # The softmax scale of dQ and dK is applied once here, to the sums over all blocks.
    dq = from_heads(dqT.transpose(0, 1, 3, 4, 2)) * scale
    dk = acc[0].transpose(0, 2, 1, 3) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), acc[1].transpose(0, 2, 1, 3).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def ring_attention_local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    axis_name: str,
    ring_size: int,
    causal: bool,
    scale: float,
    unroll: int = 1,
    kv_chunk: int | None = None,
) -> jax.Array:
    """Ring attention on per-device blocks; call inside ``jax.shard_map`` over ``axis_name``.

    Args:
      q: [b, c, h, d] local queries (c even: front and back half of the zigzag pair).
      k, v: [b, c, hkv, d] local keys/values (h % hkv == 0; never repeated).
      segment_ids: [b, c] int32, 0 = padding; positions: [b, c] int32 original token order.
      axis_name: the ring mesh axis; ring_size: its size (static).
      causal, scale: as ``AttentionFn``; unroll: ``lax.scan`` unroll of the ring loop.
      kv_chunk: KV tokens per inner flash step inside a ring step (None: each sub-block at
        once); the scores buffer is at most [b, h, c, min(kv_chunk, c/2)].

    Returns:
      [b, c, h, d] in q's dtype; rows with no visible key are 0.
    """
    out, _ = _ring_forward(
        q, k, v, segment_ids, positions, axis_name, ring_size, causal, scale, unroll, kv_chunk
    )
    return out


def _vjp_fwd(
    q, k, v, segment_ids, positions, axis_name, ring_size, causal, scale, unroll, kv_chunk
):
    out, lse = _ring_forward(
        q, k, v, segment_ids, positions, axis_name, ring_size, causal, scale, unroll, kv_chunk
    )
    return out, (q, k, v, segment_ids, positions, out, lse)


def _vjp_bwd(axis_name, ring_size, causal, scale, unroll, kv_chunk, res, g):
    dq, dk, dv = _ring_backward(res, g, axis_name, ring_size, causal, scale, unroll, kv_chunk)
    return dq, dk, dv, None, None


ring_attention_local.defvjp(_vjp_fwd, _vjp_bwd)
