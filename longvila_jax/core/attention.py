"""The attention-kernel interface of the model and its dense single-device reference.

The LLM and the vision tower call an ``AttentionFn``; the dense one below is the default and
the numerical reference for the sequence-parallel kernels of ``longvila_jax.parallel``, which
plug in with the same signature.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: keeps exp/logsumexp NaN-free on rows with no visible key.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# ``jax.ad_checkpoint.checkpoint_name`` of the attention output (the model tags it after every
# ``AttentionFn`` call), kept by the ``save_attention`` remat policy (``models.layers``). Here in
# the leaf so a kernel with a ``custom_vjp`` can give its own residuals (o, LSE) the same name.
ATTENTION_OUT = "attention_out"


class AttentionFn(Protocol):
    """Signature every attention kernel implements.

    Args:
      q: [batch, seq, heads, head_dim] queries (RoPE already applied).
      k: [batch, seq, kv_heads, head_dim] keys; ``heads % kv_heads == 0`` (GQA/MQA).
      v: [batch, seq, kv_heads, head_dim] values.
      segment_ids: [batch, seq] int32; tokens attend only within equal non-zero ids; 0 = padding.
      positions: [batch, seq] int32 token order used by the causal mask (a key is visible when its
        position is <= the query's). Any permutation of the sequence axis is therefore valid.
      causal: apply the causal mask.
      scale: softmax scale (usually head_dim ** -0.5).

    Returns:
      [batch, seq, heads, head_dim] in q's dtype. Rows with no visible key return zeros.
    """

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        segment_ids: jax.Array,
        positions: jax.Array,
        causal: bool,
        scale: float,
    ) -> jax.Array: ...


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
) -> jax.Array:
    """Visibility [batch, q_len, kv_len]: same non-zero segment and (causal) kv pos <= q pos."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        q_segment_ids[:, :, None] != 0
    )
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def dense_attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    causal: bool,
    scale: float,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Materialised-scores attention; also returns the fp32 log-sum-exp.

    ``kv_segment_ids``/``kv_positions`` default to the query ones (self-attention); pass them when
    q and kv cover different tokens (a ring block, a KV cache).

    Returns:
      out: [batch, q_len, heads, head_dim] (q.dtype); lse: [batch, heads, q_len] fp32, equal to
      MASK_VALUE-ish (very negative) on rows without a visible key.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_pos = positions if kv_positions is None else kv_positions
    # Group query heads by their KV head instead of repeating K/V (GQA without materialising).
    qg = q.reshape(b, tq, hkv, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(segment_ids, kv_seg, positions, kv_pos, causal)[:, None, None]
    s = jnp.where(mask, s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)  # [b, hkv, g, tq]
    p = jnp.exp(s - lse[..., None])
    p = jnp.where(mask, p, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype), lse.reshape(b, h, tq)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array,
    causal: bool,
    scale: float,
) -> jax.Array:
    """The default ``AttentionFn``: dense, one device, fp32 softmax; shapes as ``AttentionFn``."""
    out, _ = dense_attention_with_lse(
        q, k, v, segment_ids=segment_ids, positions=positions, causal=causal, scale=scale
    )
    return out
