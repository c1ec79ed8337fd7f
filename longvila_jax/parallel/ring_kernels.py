"""Block kernels of the ring: one (q block, kv block) attention forward / backward in XLA.

Layouts are chosen so that every score-sized tensor ([tq, tk] per head) is produced and consumed
by plain row-major matmuls: XLA:CPU (and cuBLAS) take ``A[M, K] @ B[K, N]`` operands as they
are, but materialise a transpose for any other operand layout, which for a [h, tq, tk] tensor
costs as much as an elementwise pass. Heads go first ("heads-major", dot_general's batch dims):

  qh, doh: [b, hkv, g, tq, d]   (g = h / hkv query heads per KV head; KV heads never repeated)
  qT, doT: [b, hkv, d, g, tq]   (transposed once per ring call, not per block)
  kh, vh:  [b, hkv, tk, d]      (the layout K/V and dK/dV travel the ring in)
  lse, delta: [b, hkv, g, tq] fp32

The forward works on scores S [.., tq, tk]; the backward on the transposed scores
S^T [.., tk, (g, tq)] = K Q^T, so that dV = P^T dO and dK = dS^T Q come out in kh's layout and
dQ^T = K^T dS^T in qT's; only K is transposed per block (a [tk, d] tensor). The softmax scale
multiplies the scores inside the elementwise fusion; the backward kernels return dK and dQ^T
*without* the scale, which callers apply once to the accumulated sums.

``block_forward`` / ``block_backward`` are the natural-layout ([b, t, h, d]) entry points (the
decode path and the GPU bench use them); the ring uses the ``*_heads`` kernels directly.

``chunked_forward`` / ``chunked_backward`` are the XLA block kernels; ``pallas_blocks`` /
``pallas_backward`` implement the same contract as fused Pallas kernels, and ``block_kernels``
picks one pair from a ``block_kernel`` setting (``block_kernel.resolve_block_kernel``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longvila_jax.core.attention import MASK_VALUE
from longvila_jax.parallel.block_kernel import interpret_pallas, resolve_block_kernel
from longvila_jax.parallel.pallas_backward import pallas_backward
from longvila_jax.parallel.pallas_blocks import pallas_forward


def varying(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Marks ``x`` as varying over the manual axes ``ref`` varies over (shard_map check_vma)."""
    want = getattr(getattr(jax.typeof(ref), "manual_axis_type", None), "varying", frozenset())
    have = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())
    missing = tuple(sorted(set(want) - set(have)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def to_heads(x: jax.Array, hkv: int) -> jax.Array:
    """[b, t, h, d] -> [b, hkv, g, t, d] (g = h / hkv)."""
    b, t, h, d = x.shape
    return x.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)


def from_heads(x: jax.Array) -> jax.Array:
    """[b, hkv, g, t, d] -> [b, t, h, d] (inverse of ``to_heads``)."""
    b, hkv, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d)


def heads_t(x: jax.Array) -> jax.Array:
    """[b, hkv, g, t, d] -> [b, hkv, d, g, t] (the transposed operand of the backward dots)."""
    return x.transpose(0, 1, 4, 2, 3)


def _visible(
    q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool, kv_major: bool
) -> jax.Array:
    """Visibility [b, tq, tk] (or [b, tk, tq] when ``kv_major``): same non-zero segment and,
    when causal, kv position <= q position (``core.attention.attention_mask`` semantics)."""
    if kv_major:
        q_segment, kv_segment = q_segment_ids[:, None, :], kv_segment_ids[:, :, None]
        q_position, kv_position = q_positions[:, None, :], kv_positions[:, :, None]
    else:
        q_segment, kv_segment = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
        q_position, kv_position = q_positions[:, :, None], kv_positions[:, None, :]
    visible = (q_segment == kv_segment) & (q_segment != 0)
    return visible & (kv_position <= q_position) if causal else visible


def forward_heads(qh, kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                  causal: bool, scale: float):  # fmt: skip
    """One block's forward with the scores materialised ([b, hkv, g, tq, tk] fp32).

    Args:
      qh: [b, hkv, g, tq, d]; kh, vh: [b, hkv, tk, d]; q_segment_ids, q_positions: [b, tq];
        kv_segment_ids, kv_positions: [b, tk] (segment id 0 = padding; positions give the
        causal order).

    Returns:
      o: [b, hkv, g, tq, d] fp32, normalised over this block's keys; lse: [b, hkv, g, tq] fp32
      (MASK_VALUE on rows with no visible key, whose o is 0).
    """
    s = jnp.einsum("bkgqd,bksd->bkgqs", qh, kh, preferred_element_type=jnp.float32)
    visible = _visible(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, kv_major=False
    )[:, None, None]
    s = jnp.where(visible, s * scale, MASK_VALUE)
    # One exp per score: masked scores underflow to 0 against a real row max; rows with no
    # visible key (row max ~ MASK_VALUE) are zeroed afterwards on the small [.., q] arrays.
    m = jnp.max(s, axis=-1)
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    o = jnp.einsum("bkgqs,bksd->bkgqd", e.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
    row_has_key = m > 0.5 * MASK_VALUE
    o = o * jnp.where(row_has_key, 1.0 / denom, 0.0)[..., None]
    return o, jnp.where(row_has_key, m + jnp.log(denom), MASK_VALUE)


def backward_heads(qh, qT, doh, doT, lse, delta, kh, vh,
                   q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                   causal: bool, scale: float):  # fmt: skip
    """One block's backward from the final LSE, on transposed scores [b, hkv, tk, g, tq].

    Args:
      qh, doh: [b, hkv, g, tq, d]; qT, doT: [b, hkv, d, g, tq]; lse: [b, hkv, g, tq] fp32 final
        LSE with rows that have no visible key set to a huge positive value (so their
        probabilities are exactly 0); delta: [b, hkv, g, tq] fp32 rowsum(dO * O);
        kh, vh: [b, hkv, tk, d]; segment ids / positions as in ``forward_heads``.

    Returns:
      dqT: [b, hkv, d, g, tq], dk, dv: [b, hkv, tk, d], fp32; dqT and dk still lack the factor
      ``scale`` (applied once by the caller to the sums over blocks).
    """
    f32 = jnp.float32
    s = jnp.einsum("bksd,bkdgq->bksgq", kh, qT, preferred_element_type=f32)
    visible = _visible(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, kv_major=True
    )[:, None, :, None]
    p = jnp.exp(jnp.where(visible, s * scale, MASK_VALUE) - lse[:, :, None])
    dp = jnp.einsum("bksd,bkdgq->bksgq", vh, doT, preferred_element_type=f32)
    ds = p * (dp - delta[:, :, None])
    dv = jnp.einsum("bksgq,bkgqd->bksd", p.astype(doh.dtype), doh, preferred_element_type=f32)
    dk = jnp.einsum("bksgq,bkgqd->bksd", ds.astype(qh.dtype), qh, preferred_element_type=f32)
    kT = kh.swapaxes(2, 3)  # [b, hkv, d, tk]: a small per-block transpose
    dqT = jnp.einsum("bkds,bksgq->bkdgq", kT, ds.astype(kh.dtype), preferred_element_type=f32)
    return dqT, dk, dv


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[b, hkv, t, ...] -> [n, b, hkv, t/n, ...] (scan-major KV chunks)."""
    b, hkv, t = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, hkv, n, t // n, *x.shape[3:]), 2, 0)


def _meta_chunks(x: jax.Array, n: int) -> jax.Array:
    """[b, t] -> [n, b, t/n]."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n), 1, 0)


def n_chunks(tk: int, kv_chunk: int | None) -> int:
    """KV chunks of one block; 1 (dense) when chunking is off or does not divide the block."""
    if not kv_chunk or tk <= kv_chunk or tk % kv_chunk:
        return 1
    return tk // kv_chunk


def merge(o, lse, o_b, lse_b):
    """fp32 online-softmax merge of heads-major partials; finite MASK_VALUE keeps empty rows
    NaN-free. o: [.., tq, d], lse: [.., tq]."""
    new = jnp.logaddexp(lse, lse_b)
    return o * jnp.exp(lse - new)[..., None] + o_b * jnp.exp(lse_b - new)[..., None], new


def chunked_forward(qh, kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                    causal, scale, kv_chunk=None):  # fmt: skip
    """``forward_heads`` flash-style over KV chunks of ``kv_chunk`` tokens (scores buffer
    [b, h, tq, kv_chunk]); one dense block when ``n_chunks`` says so. Same shapes."""
    dense = functools.partial(forward_heads, causal=causal, scale=scale)
    n = n_chunks(kh.shape[2], kv_chunk)
    if n == 1:
        return dense(qh, kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    o = varying(varying(jnp.zeros(qh.shape, jnp.float32), qh), kh)
    lse = varying(varying(jnp.full(qh.shape[:-1], MASK_VALUE, jnp.float32), qh), kh)

    def body(carry, part):
        kh_part, vh_part, segment_ids_part, positions_part = part
        o_part, lse_part = dense(
            qh, kh_part, vh_part, q_segment_ids, segment_ids_part, q_positions, positions_part
        )
        return merge(*carry, o_part, lse_part), None

    parts = (
        _chunks(kh, n), _chunks(vh, n),
        _meta_chunks(kv_segment_ids, n), _meta_chunks(kv_positions, n),
    )  # fmt: skip
    (o, lse), _ = jax.lax.scan(body, (o, lse), parts)
    return o, lse


def chunked_backward(qh, qT, doh, doT, lse, delta, kh, vh,
                     q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                     causal, scale, kv_chunk=None):  # fmt: skip
    """``backward_heads`` over KV chunks of ``kv_chunk`` tokens; same arguments and results."""
    dense = functools.partial(backward_heads, causal=causal, scale=scale)
    q_side = (qh, qT, doh, doT, lse, delta)
    n = n_chunks(kh.shape[2], kv_chunk)
    if n == 1:
        return dense(*q_side, kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    dqT = varying(varying(jnp.zeros(qT.shape, jnp.float32), qT), kh)

    def body(dqT, part):
        kh_part, vh_part, segment_ids_part, positions_part = part
        dqT_part, dk_part, dv_part = dense(
            *q_side, kh_part, vh_part, q_segment_ids, segment_ids_part, q_positions, positions_part
        )
        return dqT + dqT_part, (dk_part, dv_part)

    parts = (
        _chunks(kh, n), _chunks(vh, n),
        _meta_chunks(kv_segment_ids, n), _meta_chunks(kv_positions, n),
    )  # fmt: skip
    dqT, (dk, dv) = jax.lax.scan(body, dqT, parts)
    unchunk = lambda x: jnp.moveaxis(x, 0, 2).reshape(kh.shape)  # noqa: E731
    return dqT, unchunk(dk), unchunk(dv)


def block_kernels(block_kernel: str = "xla", interpret: bool | None = None):
    """The (forward, backward) heads-major block kernels of a ``block_kernel`` setting.

    Args:
      block_kernel: "auto", "xla" or "pallas" (``block_kernel.resolve_block_kernel``).
      interpret: for Pallas, run in the interpreter (default: when the backend is not a GPU).

    Returns:
      ``(chunked_forward, chunked_backward)`` or their Pallas equivalents; both pairs take the
      same arguments and return the same layouts and dtypes.
    """
    if resolve_block_kernel(block_kernel) == "xla":
        return chunked_forward, chunked_backward
    interpret = interpret_pallas(interpret)
    return (
        functools.partial(pallas_forward, interpret=interpret),
        functools.partial(pallas_backward, interpret=interpret),
    )


def safe_lse(lse: jax.Array) -> jax.Array:
    """Rows without a visible key carry lse ~ MASK_VALUE; a huge positive stand-in makes their
    (fully masked) probabilities exactly 0 in the backward, with no second mask pass."""
    return jnp.where(lse > 0.5 * MASK_VALUE, lse, -MASK_VALUE)


def block_forward(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                  causal, scale, kv_chunk=None, block_kernel="xla", interpret=None):  # fmt: skip
    """One attention block in the natural layout, flash-style over KV chunks.

    Args:
      q: [b, tq, h, d]; k, v: [b, tk, hkv, d]; q_segment_ids, q_positions: [b, tq];
        kv_segment_ids, kv_positions: [b, tk].
      kv_chunk: KV tokens per inner step (scores buffer [b, h, tq, kv_chunk]); None = one step.
      block_kernel: "xla", "pallas" or "auto" (``block_kernels``); interpret: for Pallas, run
        in the interpreter (default: when the backend is not a GPU).

    Returns:
      o: [b, tq, h, d] fp32 normalised block output; lse: [b, h, tq] fp32 (very negative on rows
      with no visible key, whose o is 0).
    """
    hkv = k.shape[2]
    kh, vh = (to_heads(x, hkv)[:, :, 0] for x in (k, v))
    forward, _ = block_kernels(block_kernel, interpret)
    o, lse = forward(
        to_heads(q, hkv), kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
        causal=causal, scale=scale, kv_chunk=kv_chunk,
    )  # fmt: skip
    return from_heads(o), lse.reshape(q.shape[0], q.shape[2], q.shape[1])


def block_backward(q, k, v, do, lse, delta, q_segment_ids, kv_segment_ids, q_positions,
                   kv_positions, *, causal, scale, kv_chunk=None, block_kernel="xla",
                   interpret=None):  # fmt: skip
    """Recomputes one natural-layout block and returns its fp32 gradient contributions.

    Args:
      q, do: [b, tq, h, d]; k, v: [b, tk, hkv, d]; lse, delta: [b, h, tq] fp32 (final LSE and
        rowsum(dO * O)); segment ids / positions, kv_chunk, block_kernel and interpret as in
        ``block_forward``.

    Returns:
      dq: [b, tq, h, d], dk, dv: [b, tk, hkv, d], all fp32.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qh, doh = to_heads(q, hkv), to_heads(do, hkv)
    kh, vh = (to_heads(x, hkv)[:, :, 0] for x in (k, v))
    by_kv_head = lambda x: x.reshape(b, hkv, h // hkv, tq)  # noqa: E731  [b, h, tq] -> heads-major
    _, backward = block_kernels(block_kernel, interpret)
    dqT, dk, dv = backward(
        qh, heads_t(qh), doh, heads_t(doh), safe_lse(by_kv_head(lse)), by_kv_head(delta),
        kh, vh, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
        causal=causal, scale=scale, kv_chunk=kv_chunk,
    )  # fmt: skip
    dq = from_heads(dqT.transpose(0, 1, 3, 4, 2)) * scale
    return dq, dk.transpose(0, 2, 1, 3) * scale, dv.transpose(0, 2, 1, 3)
