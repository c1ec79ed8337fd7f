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

The quarters are the XLA kernels' granularity. With the fused Pallas block kernels
(``block_kernel="pallas"``, see ``block_kernel.py``) every step that is not SKIP runs the whole
block in one kernel call: the kernels skip every tile without a visible pair from the same
segment / position ranges, at a finer grain than quarters, and hold no score buffer in memory.

Every array here is one device's block (the module runs inside ``jax.shard_map``): the entry
point takes ``*_local`` arguments, the package's naming rule for shard_map bodies. Inside, the
``q*`` arrays (``qh``, ``q_segment_ids``...) are this rank's own queries, and ``kv`` /
``kv_meta`` the key/value block visiting this step with its segment ids and positions.

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
from longvila_jax.parallel.block_kernel import resolve_block_kernel
from longvila_jax.parallel.ring_kernels import (
    block_backward,
    block_forward,
    block_kernels,
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


def _ranges(segment_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
    """Per-row [b] min/max segment id and min/max position over non-padding tokens."""
    valid = segment_ids != 0
    return (
        jnp.min(jnp.where(valid, segment_ids, _BIG), axis=1),
        jnp.max(jnp.where(valid, segment_ids, -1), axis=1),
        jnp.min(jnp.where(valid, positions, _BIG), axis=1),
        jnp.max(jnp.where(valid, positions, -_BIG), axis=1),
    )


def _may_attend(
    q_ranges: tuple[jax.Array, ...], kv_ranges: tuple[jax.Array, ...], causal: bool
) -> jax.Array:
    """Scalar bool: some row may have a visible (q, kv) pair (a necessary condition)."""
    q_min_segment, q_max_segment, _, q_max_position = q_ranges
    kv_min_segment, kv_max_segment, kv_min_position, _ = kv_ranges
    # The segment ranges overlap (false when either side is all padding) and, when causal, the
    # earliest key is not after the latest query.
    may = (q_max_segment >= kv_min_segment) & (kv_max_segment >= q_min_segment)
    if causal:
        may &= kv_min_position <= q_max_position
    return jnp.any(may)


def select_mode(
    q_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_segment_ids: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
) -> jax.Array:
    """Picks SKIP / FULL / KV_FRONT / Q_BACK / DIAG for one (local q block, kv block) step.

    Args:
      q_segment_ids, q_positions: [b, c] segment ids and positions of the local queries.
      kv_segment_ids, kv_positions: [b, c] the same for the kv block of this step.
      causal: whether the causal mask applies.

    Returns:
      int32 scalar mode index: the cheapest branch covering every quarter that may attend.
    """
    half = q_segment_ids.shape[1] // 2
    q_front = _ranges(q_segment_ids[:, :half], q_positions[:, :half])
    q_back = _ranges(q_segment_ids[:, half:], q_positions[:, half:])
    kv_front = _ranges(kv_segment_ids[:, :half], kv_positions[:, :half])
    kv_back = _ranges(kv_segment_ids[:, half:], kv_positions[:, half:])
    front_front = _may_attend(q_front, kv_front, causal)
    front_back = _may_attend(q_front, kv_back, causal)
    back_front = _may_attend(q_back, kv_front, causal)
    back_back = _may_attend(q_back, kv_back, causal)
    mode = jnp.where(front_back, FULL, DIAG)
    mode = jnp.where(~(front_front | front_back), Q_BACK, mode)
    mode = jnp.where(~(front_back | back_back), KV_FRONT, mode)
    nothing = ~(front_front | front_back | back_front | back_back)
    return jnp.where(nothing, SKIP, mode).astype(jnp.int32)


def _in_sequence(carry, *fns):
    """``fns[-1](...fns[0](carry))`` as a loop over a switch, so the sub-blocks run one after
    the other: XLA would otherwise interleave two independent sub-blocks and keep both score
    buffers live, and the largest branch sets every step's temp memory."""
    return jax.lax.fori_loop(0, len(fns), lambda i, c: jax.lax.switch(i, fns, c), carry)


def _switch(mode, block, start, half: int, whole_block: bool):
    """Runs the branch ``mode`` (SKIP / FULL / KV_FRONT / Q_BACK / DIAG) of one ring step.

    ``block(rows, cols)`` returns an ``accumulator -> accumulator`` update with the work of the
    local q rows ``rows`` against the kv rows ``cols`` (slices of the block); ``start`` is the
    accumulator the step begins from. Every branch keeps scores at most [c, c/2] (see
    ``_in_sequence``). With ``whole_block`` (Pallas kernels, which skip masked tiles
    themselves) only SKIP is told apart; any other mode runs the whole block at once.
    """
    front, back, every = slice(None, half), slice(half, None), slice(None)
    if whole_block:
        return jax.lax.cond(mode == SKIP, lambda: start, lambda: block(every, every)(start))
    branches = (
        lambda: start,  # SKIP
        lambda: _in_sequence(start, block(every, front), block(every, back)),  # FULL
        lambda: block(every, front)(start),  # KV_FRONT
        lambda: block(back, every)(start),  # Q_BACK
        lambda: _in_sequence(start, block(front, front), block(back, every)),  # DIAG
    )
    return jax.lax.switch(mode, branches)


def _fwd_step(
    qh, kv, q_segment_ids, q_positions, kv_meta, o, lse, causal, scale, kv_chunk, block_kernel
):
    """One forward step: merges this kv block into the rows it reaches of the local fp32
    accumulators o [b, hkv, g, c, d] and lse [b, hkv, g, c]; returns them. ``block_kernel``
    picks the block kernel (``ring_kernels.block_kernels``: XLA or fused Pallas)."""
    kh, vh = kv[0], kv[1]
    kv_segment_ids, kv_positions = kv_meta[0], kv_meta[1]
    block_kernel = resolve_block_kernel(block_kernel)
    forward, _ = block_kernels(block_kernel)
    kernel = functools.partial(forward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def block(rows, cols):
        def update(accumulator):
            o_acc, lse_acc = accumulator
            o_b, lse_b = kernel(
                qh[:, :, :, rows], kh[:, :, cols], vh[:, :, cols],
                q_segment_ids[:, rows], kv_segment_ids[:, cols],
                q_positions[:, rows], kv_positions[:, cols],
            )  # fmt: skip
            o_rows, lse_rows = merge(o_acc[:, :, :, rows], lse_acc[..., rows], o_b, lse_b)
            return o_acc.at[:, :, :, rows].set(o_rows), lse_acc.at[..., rows].set(lse_rows)

        return update

    mode = select_mode(q_segment_ids, q_positions, kv_segment_ids, kv_positions, causal)
    return _switch(mode, block, (o, lse), qh.shape[3] // 2, block_kernel == "pallas")


def _shift(x, axis_name: str, ring_size: int):
    """Sends ``x`` to the next ring rank (r -> r + 1) and returns what the previous one sent."""
    return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % ring_size) for i in range(ring_size)])


def _ring_forward(
    q, k, v, segment_ids, positions, axis_name, ring_size, causal, scale, unroll, kv_chunk,
    block_kernel,
):  # fmt: skip
    """Returns o [b, c, h, d] in q's dtype and the final lse [b, hkv, g, c] fp32."""
    hkv = k.shape[2]
    qh = to_heads(q, hkv)
    kv = jnp.stack([to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0]])  # [2, b, hkv, c, d]
    kv_meta = jnp.stack([segment_ids, positions])  # travels with its kv block
    # The carries vary over q's and kv's manual axes, like every branch's merged output.
    o = varying(varying(jnp.zeros(qh.shape, jnp.float32), qh), kv)
    lse = varying(varying(jnp.full(qh.shape[:-1], MASK_VALUE, jnp.float32), qh), kv)

    def step(kv, kv_meta, o, lse, send):
        if send:  # issued before the compute that does not depend on it
            next_kv = (_shift(kv, axis_name, ring_size), _shift(kv_meta, axis_name, ring_size))
        else:
            next_kv = (kv, kv_meta)
        o, lse = _fwd_step(
            qh, kv, segment_ids, positions, kv_meta, o, lse, causal, scale, kv_chunk, block_kernel
        )
        return next_kv[0], next_kv[1], o, lse

    if ring_size > 1:  # steps 0..R-2 send the next block; the last step sends nothing

        def body(carry, _):
            return step(*carry, True), None

        (kv, kv_meta, o, lse), _ = jax.lax.scan(
            body, (kv, kv_meta, o, lse), None, length=ring_size - 1, unroll=unroll
        )
    kv, kv_meta, o, lse = step(kv, kv_meta, o, lse, False)
    return from_heads(o).astype(q.dtype), lse


def _bwd_step(
    q_side, kv, q_segment_ids, q_positions, kv_meta, dqT, causal, scale, kv_chunk, block_kernel
):
    """One backward step. ``q_side`` = (qh, qT, doh, doT, lse, delta) of the local queries. Adds
    this kv block's dQ^T into the rows it reaches of ``dqT`` [b, hkv, d, g, c] and returns it
    with the block's own fp32 dK/dV [2, b, hkv, c, d] (zero where not reached), kept apart from
    the incoming dK/dV accumulator so that the compute need not wait for that hop."""
    qh, qT, doh, doT, lse, delta = q_side
    kh, vh = kv[0], kv[1]
    kv_segment_ids, kv_positions = kv_meta[0], kv_meta[1]
    block_kernel = resolve_block_kernel(block_kernel)
    _, backward = block_kernels(block_kernel)
    kernel = functools.partial(backward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def block(rows, cols):
        def update(accumulator):
            dqT_acc, dkv_acc = accumulator
            dq_b, dk, dv = kernel(
                qh[:, :, :, rows], qT[..., rows], doh[:, :, :, rows], doT[..., rows],
                lse[..., rows], delta[..., rows], kh[:, :, cols], vh[:, :, cols],
                q_segment_ids[:, rows], kv_segment_ids[:, cols],
                q_positions[:, rows], kv_positions[:, cols],
            )  # fmt: skip
            dkv = dkv_acc.at[:, :, :, cols].add(jnp.stack([dk, dv]))
            return dqT_acc.at[..., rows].add(dq_b), dkv

        return update

    zeros = varying(varying(jnp.zeros(kv.shape, jnp.float32), kv), qh)
    mode = select_mode(q_segment_ids, q_positions, kv_segment_ids, kv_positions, causal)
    return _switch(mode, block, (dqT, zeros), qh.shape[3] // 2, block_kernel == "pallas")


def _ring_backward(
    residuals, d_out, axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel
):
    q, k, v, segment_ids, positions, out, lse = residuals
    hkv = k.shape[2]
    qh, doh = to_heads(q, hkv), to_heads(d_out.astype(q.dtype), hkv)
    f32 = jnp.float32
    # rowsum(dO * O) [b, hkv, g, c], once per call
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", doh.astype(f32), to_heads(out, hkv).astype(f32))
    q_side = (qh, heads_t(qh), doh, heads_t(doh), safe_lse(lse), delta)
    kv = jnp.stack([to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0]])  # [2, b, hkv, c, d]
    kv_meta = jnp.stack([segment_ids, positions])
    dqT = varying(varying(jnp.zeros(heads_t(qh).shape, f32), qh), kv)

    def step(kv, kv_meta, dqT, dkv_acc, send_kv, recv_acc):
        # Both hops are issued before this step's compute: the next KV block and the finished
        # dK/dV accumulator of the previous block (one-hop lag), which the neighbour needs now.
        next_kv = (
            (_shift(kv, axis_name, ring_size), _shift(kv_meta, axis_name, ring_size))
            if send_kv
            else (kv, kv_meta)
        )
        dkv_in = _shift(dkv_acc, axis_name, ring_size) if recv_acc else None
        dqT, dkv_block = _bwd_step(
            q_side, kv, segment_ids, positions, kv_meta, dqT, causal, scale, kv_chunk, block_kernel
        )
        dkv_acc = dkv_block if dkv_in is None else dkv_in + dkv_block
        return next_kv[0], next_kv[1], dqT, dkv_acc

    dkv_acc = varying(varying(jnp.zeros(kv.shape, f32), kv), qh)
    kv, kv_meta, dqT, dkv_acc = step(kv, kv_meta, dqT, dkv_acc, ring_size > 1, False)
    if ring_size > 2:

        def body(carry, _):
            return step(*carry, True, True), None

        (kv, kv_meta, dqT, dkv_acc), _ = jax.lax.scan(
            body, (kv, kv_meta, dqT, dkv_acc), None, length=ring_size - 2, unroll=unroll
        )
    if ring_size > 1:
        kv, kv_meta, dqT, dkv_acc = step(kv, kv_meta, dqT, dkv_acc, False, True)
        dkv_acc = _shift(dkv_acc, axis_name, ring_size)  # the last hop brings dK/dV home
    # The softmax scale of dQ and dK is applied once here, to the sums over all blocks.
    dq = from_heads(dqT.transpose(0, 1, 3, 4, 2)) * scale
    dk = dkv_acc[0].transpose(0, 2, 1, 3) * scale
    dq, dk = dq.astype(q.dtype), dk.astype(k.dtype)
    return dq, dk, dkv_acc[1].transpose(0, 2, 1, 3).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def ring_attention_local(
    q_local: jax.Array,
    k_local: jax.Array,
    v_local: jax.Array,
    segment_ids_local: jax.Array,
    positions_local: jax.Array,
    axis_name: str,
    ring_size: int,
    causal: bool,
    scale: float,
    unroll: int = 1,
    kv_chunk: int | None = None,
    block_kernel: str = "xla",
) -> jax.Array:
    """Ring attention on per-device blocks; call inside ``jax.shard_map`` over ``axis_name``.

    Args:
      q_local: [b, c, h, d] local queries (c even: front and back half of the zigzag pair).
      k_local, v_local: [b, c, hkv, d] local keys/values (h % hkv == 0; never repeated).
      segment_ids_local: [b, c] int32, 0 = padding; positions_local: [b, c] int32 original
        token order.
      axis_name: the ring mesh axis; ring_size: its size (static).
      causal, scale: as ``AttentionFn``; unroll: ``lax.scan`` unroll of the ring loop.
      kv_chunk: KV tokens per inner flash step inside a ring step (None: each sub-block at
        once); the scores buffer is at most [b, h, c, min(kv_chunk, c/2)]. With Pallas it caps
        the KV tile instead (``pallas_blocks.fit_tile``).
      block_kernel: "xla", "pallas" or "auto": the block kernels of every ring step
        (``ring_kernels.block_kernels``; "auto" is pallas on a GPU backend, xla elsewhere).
        Pallas' interpreter (off a GPU) needs the enclosing shard_map's ``check_vma=False``
        (``attention.make_mmsp_attention`` sets it).

    Returns:
      [b, c, h, d] in q's dtype; rows with no visible key are 0.
    """
    out, _ = _ring_forward(
        q_local, k_local, v_local, segment_ids_local, positions_local,
        axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel,
    )  # fmt: skip
    return out


def _vjp_fwd(q_local, k_local, v_local, segment_ids_local, positions_local,
             axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel):  # fmt: skip
    out, lse = _ring_forward(
        q_local, k_local, v_local, segment_ids_local, positions_local,
        axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel,
    )  # fmt: skip
    return out, (q_local, k_local, v_local, segment_ids_local, positions_local, out, lse)


def _vjp_bwd(axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel, residuals,
             d_out):  # fmt: skip
    dq, dk, dv = _ring_backward(
        residuals, d_out, axis_name, ring_size, causal, scale, unroll, kv_chunk, block_kernel
    )
    return dq, dk, dv, None, None


ring_attention_local.defvjp(_vjp_fwd, _vjp_bwd)
