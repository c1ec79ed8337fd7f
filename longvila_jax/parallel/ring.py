"""Zigzag ring attention over one mesh axis, for use inside ``jax.shard_map``.

Each ring rank holds one sequence block (q, k, v, segment ids, positions). KV blocks travel
r -> r+1 with ``ppermute`` (the next hop is issued before the step's compute so XLA can overlap
it); partial results merge with an fp32 online softmax (o and LSE in fp32). The backward is a
``jax.custom_vjp`` that recomputes blocks and rotates fp32 dK/dV accumulators with a one-hop
lag, so autodiff never goes through the ring loop.

Work per step is chosen from the data, not from chunk arithmetic: the local block is split into
a front and a back half and, from min/max ranges of segment ids and positions, each step picks
one of skip / full / all-q-vs-front-kv / back-q-vs-all-kv (``lax.switch``). Under the zigzag
layout (rank r holds chunks r and 2R-1-r, see ``layouts.py``) this reproduces the dual-chunk
schedule exactly (step 0 full causal, j < r front KV, j > r back Q: every rank does half a block
on every later step), while the mask itself always comes from the positions and segment ids
carried with the blocks, so any permutation of tokens and any packing is computed correctly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longvila_jax.models.attention import MASK_VALUE, attention_mask

SKIP, FULL, KV_FRONT, Q_BACK = 0, 1, 2, 3
_BIG = jnp.iinfo(jnp.int32).max


def _varying(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Marks ``x`` as varying over the manual axes ``ref`` varies over (shard_map check_vma)."""
    want = getattr(getattr(jax.typeof(ref), "manual_axis_type", None), "varying", frozenset())
    have = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())
    missing = tuple(sorted(set(want) - set(have)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


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
    """Picks SKIP / FULL / KV_FRONT / Q_BACK for one (local q block, kv block) step.

    Args:
      q_seg, q_pos: [b, c] segment ids and positions of the local queries.
      k_seg, k_pos: [b, c] the same for the kv block of this step.
      causal: whether the causal mask applies.

    Returns:
      int32 scalar mode index.
    """
    h = q_seg.shape[1] // 2
    qf, qb = _ranges(q_seg[:, :h], q_pos[:, :h]), _ranges(q_seg[:, h:], q_pos[:, h:])
    kf, kb = _ranges(k_seg[:, :h], k_pos[:, :h]), _ranges(k_seg[:, h:], k_pos[:, h:])
    n_ff, n_fb = _may_attend(qf, kf, causal), _may_attend(qf, kb, causal)
    n_bf, n_bb = _may_attend(qb, kf, causal), _may_attend(qb, kb, causal)
    mode = jnp.where(~(n_fb | n_bb), KV_FRONT, jnp.where(~(n_ff | n_fb), Q_BACK, FULL))
    return jnp.where(~(n_ff | n_fb | n_bf | n_bb), SKIP, mode).astype(jnp.int32)


def _heads_major(x: jax.Array, hkv: int) -> jax.Array:
    """[b, t, h, d] -> [b, hkv, g, t, d]: dot_general's natural layout (batch dims first), so
    the big score tensors [b, hkv, g, tq, tk] never need a transpose."""
    b, t, h, d = x.shape
    return x.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)


def _scores(qh, kh, q_seg, k_seg, q_pos, k_pos, causal, scale):
    """Masked fp32 scores [b, hkv, g, tq, tk]; the mask is an additive [b, 1, 1, tq, tk] bias."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qh, kh, preferred_element_type=jnp.float32)
    bias = jnp.where(attention_mask(q_seg, k_seg, q_pos, k_pos, causal), 0.0, MASK_VALUE)
    return s * scale + bias[:, None, None]


def _dense_block_forward(q, k, v, q_seg, k_seg, q_pos, k_pos, *, causal: bool, scale: float):
    """One attention block without repeating KV heads (scores materialised: [b, h, tq, tk]).

    Args:
      q: [b, tq, h, d]; k, v: [b, tk, hkv, d]; q_seg, q_pos: [b, tq]; k_seg, k_pos: [b, tk].

    Returns:
      o: [b, tq, h, d] fp32 normalised block output; lse: [b, h, tq] fp32 (very negative on rows
      with no visible key, whose o is 0).
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = _scores(_heads_major(q, hkv), kh, q_seg, k_seg, q_pos, k_pos, causal, scale)
    # One exp per score: masked scores underflow to 0 against a real row max; rows with no
    # visible key (row max ~ MASK_VALUE) are zeroed afterwards on the small [.., q] arrays.
    m = jnp.max(s, axis=-1)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    o = jnp.einsum("bkgqs,bksd->bkgqd", e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    row_ok = m > 0.5 * MASK_VALUE
    o = o * jnp.where(row_ok, 1.0 / denom, 0.0)[..., None]
    lse = jnp.where(row_ok, m + jnp.log(denom), MASK_VALUE)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d), lse.reshape(b, h, tq)


def _dense_block_backward(q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos, *, causal, scale):
    """Recomputes one block and returns its fp32 gradient contributions (scores materialised).

    Args:
      q, do: [b, tq, h, d]; k, v: [b, tk, hkv, d]; lse, delta: [b, h, tq] fp32 (final LSE and
        rowsum(dO * O)); segment ids / positions as in ``block_forward``.

    Returns:
      dq: [b, tq, h, d], dk, dv: [b, tk, hkv, d], all fp32.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qh, doh = _heads_major(q, hkv), _heads_major(do, hkv)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = _scores(qh, kh, q_seg, k_seg, q_pos, k_pos, causal, scale)
    # Rows without a visible key carry lse ~ MASK_VALUE; a huge positive stand-in makes their
    # (fully masked) probabilities exactly 0, so no second mask pass over the scores is needed.
    lse = jnp.where(lse > 0.5 * MASK_VALUE, lse, -MASK_VALUE)
    p = jnp.exp(s - lse.reshape(b, hkv, g, tq)[..., None])
    f32 = jnp.float32
    dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do.dtype), doh, preferred_element_type=f32)
    dp = jnp.einsum("bkgqd,bksd->bkgqs", doh, vh, preferred_element_type=f32)
    ds = p * (dp - delta.reshape(b, hkv, g, tq)[..., None])
    dq = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k.dtype), kh, preferred_element_type=f32)
    dk = jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(q.dtype), qh, preferred_element_type=f32)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
    return dq * scale, dk.transpose(0, 2, 1, 3) * scale, dv.transpose(0, 2, 1, 3)


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[b, t, ...] -> [n, b, t/n, ...] (scan-major KV chunks)."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _n_chunks(tk: int, kv_chunk: int | None) -> int:
    """KV chunks of one block; 1 (dense) when chunking is off or does not divide the block."""
    if not kv_chunk or tk <= kv_chunk or tk % kv_chunk:
        return 1
    return tk // kv_chunk


def block_forward(q, k, v, q_seg, k_seg, q_pos, k_pos, *, causal, scale, kv_chunk=None):
    """One attention block, flash-style over KV chunks so no [tq, tk] buffer is materialised.

    Args:
      q: [b, tq, h, d]; k, v: [b, tk, hkv, d]; q_seg, q_pos: [b, tq]; k_seg, k_pos: [b, tk].
      kv_chunk: KV tokens per inner step (scores buffer [b, h, tq, kv_chunk]); None = one step.

    Returns:
      o: [b, tq, h, d] fp32 normalised block output; lse: [b, h, tq] fp32 (very negative on rows
      with no visible key, whose o is 0).
    """
    dense = functools.partial(_dense_block_forward, causal=causal, scale=scale)
    n = _n_chunks(k.shape[1], kv_chunk)
    if n == 1:
        return dense(q, k, v, q_seg, k_seg, q_pos, k_pos)
    b, tq, h, d = q.shape
    o = _varying(_varying(jnp.zeros((b, tq, h, d), jnp.float32), q), k)
    lse = _varying(_varying(jnp.full((b, h, tq), MASK_VALUE, jnp.float32), q), k)

    def body(carry, xs):
        kc, vc, sc, pc = xs
        o_c, lse_c = dense(q, kc, vc, q_seg, sc, q_pos, pc)
        return _merge(*carry, o_c, lse_c), None

    xs = tuple(_chunks(x, n) for x in (k, v, k_seg, k_pos))
    (o, lse), _ = jax.lax.scan(body, (o, lse), xs)
    return o, lse


def block_backward(q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos, *, causal, scale,
                   kv_chunk=None):  # fmt: skip
    """Recomputes one block over KV chunks and returns its fp32 gradient contributions.

    Args:
      q, do: [b, tq, h, d]; k, v: [b, tk, hkv, d]; lse, delta: [b, h, tq] fp32 (final LSE and
        rowsum(dO * O)); segment ids / positions as in ``block_forward``; kv_chunk as there.

    Returns:
      dq: [b, tq, h, d], dk, dv: [b, tk, hkv, d], all fp32.
    """
    dense = functools.partial(_dense_block_backward, causal=causal, scale=scale)
    n = _n_chunks(k.shape[1], kv_chunk)
    if n == 1:
        return dense(q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos)
    dq = _varying(_varying(jnp.zeros(q.shape, jnp.float32), q), k)

    def body(dq, xs):
        kc, vc, sc, pc = xs
        dq_c, dk_c, dv_c = dense(q, kc, vc, do, lse, delta, q_seg, sc, q_pos, pc)
        return dq + dq_c, (dk_c, dv_c)

    xs = tuple(_chunks(x, n) for x in (k, v, k_seg, k_pos))
    dq, (dk, dv) = jax.lax.scan(body, dq, xs)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # noqa: E731
    return dq, unchunk(dk), unchunk(dv)


def _fwd_modes(q, kv, q_seg, q_pos, meta, causal, scale, kv_chunk):
    """The four forward branches; each returns full-size (o [b,c,h,d], lse [b,h,c]) fp32."""
    b, c, h, d = q.shape
    half = c // 2
    k, v = kv[0], kv[1]
    k_seg, k_pos = meta[0], meta[1]
    blk = functools.partial(block_forward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def skip():
        # Branch outputs must agree in varying axes: the others mix local q with rotated kv.
        o = _varying(jnp.zeros((b, c, h, d), jnp.float32), q)
        lse = _varying(jnp.full((b, h, c), MASK_VALUE, jnp.float32), q)
        return _varying(o, kv), _varying(lse, kv)

    def full():
        return blk(q, k, v, q_seg, k_seg, q_pos, k_pos)

    def kv_front():
        return blk(q, k[:, :half], v[:, :half], q_seg, k_seg[:, :half], q_pos, k_pos[:, :half])

    def q_back():
        o, lse = blk(q[:, half:], k, v, q_seg[:, half:], k_seg, q_pos[:, half:], k_pos)
        o0 = _varying(jnp.zeros((b, half, h, d), jnp.float32), o)
        l0 = _varying(jnp.full((b, h, half), MASK_VALUE, jnp.float32), lse)
        return jnp.concatenate([o0, o], axis=1), jnp.concatenate([l0, lse], axis=2)

    mode = select_mode(q_seg, q_pos, k_seg, k_pos, causal)
    return jax.lax.switch(mode, (skip, full, kv_front, q_back))


def _merge(o, lse, o_b, lse_b):
    """fp32 online-softmax merge; finite MASK_VALUE keeps empty rows NaN-free."""
    new = jnp.logaddexp(lse, lse_b)
    w_old = jnp.exp(lse - new).transpose(0, 2, 1)[..., None]
    w_new = jnp.exp(lse_b - new).transpose(0, 2, 1)[..., None]
    return o * w_old + o_b * w_new, new


def _shift(x, axis_name: str, ring_size: int):
    return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % ring_size) for i in range(ring_size)])


def _ring_forward(q, k, v, seg, pos, axis_name, ring_size, causal, scale, unroll, kv_chunk):
    b, c, h, d = q.shape
    kv = jnp.stack([k, v])
    meta = jnp.stack([seg, pos])
    o = _varying(jnp.zeros((b, c, h, d), jnp.float32), q)
    lse = _varying(jnp.full((b, h, c), MASK_VALUE, jnp.float32), q)

    def step(kv, meta, o, lse, send):
        if send:  # issued before the compute that does not depend on it
            nxt = (_shift(kv, axis_name, ring_size), _shift(meta, axis_name, ring_size))
        else:
            nxt = (kv, meta)
        o_b, lse_b = _fwd_modes(q, kv, seg, pos, meta, causal, scale, kv_chunk)
        o, lse = _merge(o, lse, o_b, lse_b)
        return nxt[0], nxt[1], o, lse

    if ring_size > 1:  # steps 0..R-2 send the next block; the last step sends nothing

        def body(carry, _):
            return step(*carry, True), None

        (kv, meta, o, lse), _ = jax.lax.scan(
            body, (kv, meta, o, lse), None, length=ring_size - 1, unroll=unroll
        )
    kv, meta, o, lse = step(kv, meta, o, lse, False)
    return o.astype(q.dtype), lse


def _bwd_modes(q, kv, do, lse, delta, q_seg, q_pos, meta, causal, scale, kv_chunk):
    """The four backward branches; each returns (dq [b,c,h,d], dkv [2,b,c,hkv,d]) fp32."""
    b, c, h, d = q.shape
    hkv = kv.shape[3]
    half = c // 2
    k, v = kv[0], kv[1]
    k_seg, k_pos = meta[0], meta[1]
    blk = functools.partial(block_backward, causal=causal, scale=scale, kv_chunk=kv_chunk)

    def skip():
        dq = _varying(jnp.zeros((b, c, h, d), jnp.float32), q)
        dkv = _varying(jnp.zeros((2, b, c, hkv, d), jnp.float32), kv)
        return _varying(dq, kv), _varying(dkv, q)

    def full():
        dq, dk, dv = blk(q, k, v, do, lse, delta, q_seg, k_seg, q_pos, k_pos)
        return dq, jnp.stack([dk, dv])

    def kv_front():
        dq, dk, dv = blk(
            q, k[:, :half], v[:, :half], do, lse, delta,
            q_seg, k_seg[:, :half], q_pos, k_pos[:, :half],
        )  # fmt: skip
        z = _varying(jnp.zeros((2, b, c - half, hkv, d), jnp.float32), dk)
        return dq, jnp.concatenate([jnp.stack([dk, dv]), z], axis=2)

    def q_back():
        dq, dk, dv = blk(
            q[:, half:], k, v, do[:, half:], lse[:, :, half:], delta[:, :, half:],
            q_seg[:, half:], k_seg, q_pos[:, half:], k_pos,
        )  # fmt: skip
        z = _varying(jnp.zeros((b, half, h, d), jnp.float32), dq)
        return jnp.concatenate([z, dq], axis=1), jnp.stack([dk, dv])

    mode = select_mode(q_seg, q_pos, k_seg, k_pos, causal)
    return jax.lax.switch(mode, (skip, full, kv_front, q_back))


def _ring_backward(res, g, axis_name, ring_size, causal, scale, unroll, kv_chunk):
    q, k, v, seg, pos, out, lse = res
    do = g.astype(q.dtype)
    b, c, h, d = q.shape
    delta = jnp.einsum(
        "bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32)
    )  # rowsum(dO * O), once per call
    kv = jnp.stack([k, v])
    meta = jnp.stack([seg, pos])
    dq = _varying(jnp.zeros((b, c, h, d), jnp.float32), q)

    def step(kv, meta, dq, acc, send_kv, recv_acc):
        # Both hops are issued before this step's compute: the next KV block and the finished
        # dK/dV accumulator of the previous block (one-hop lag), which the neighbour needs now.
        nxt = (
            (_shift(kv, axis_name, ring_size), _shift(meta, axis_name, ring_size))
            if send_kv
            else (kv, meta)
        )
        acc_in = _shift(acc, axis_name, ring_size) if recv_acc else None
        dq_b, dkv_b = _bwd_modes(q, kv, do, lse, delta, seg, pos, meta, causal, scale, kv_chunk)
        acc = dkv_b if acc_in is None else acc_in + dkv_b
        return nxt[0], nxt[1], dq + dq_b, acc

    acc = _varying(jnp.zeros(kv.shape, jnp.float32), kv)
    kv, meta, dq, acc = step(kv, meta, dq, acc, ring_size > 1, False)
    if ring_size > 2:

        def body(carry, _):
            return step(*carry, True, True), None

        (kv, meta, dq, acc), _ = jax.lax.scan(
            body, (kv, meta, dq, acc), None, length=ring_size - 2, unroll=unroll
        )
    if ring_size > 1:
        kv, meta, dq, acc = step(kv, meta, dq, acc, False, True)
        acc = _shift(acc, axis_name, ring_size)  # the last hop brings dK/dV home
    return (
        dq.astype(q.dtype),
        acc[0].astype(k.dtype),
        acc[1].astype(v.dtype),
        None,
        None,
    )


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
      kv_chunk: KV tokens per inner flash step inside a ring step (None: whole half/full
        block at once); bounds the scores buffer to [b, h, c, kv_chunk].

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
    return _ring_backward(res, g, axis_name, ring_size, causal, scale, unroll, kv_chunk)


ring_attention_local.defvjp(_vjp_fwd, _vjp_bwd)
