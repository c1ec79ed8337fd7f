"""Ulysses (DeepSpeed-style) sequence <-> head all-to-all over one mesh axis, with GQA support.

Inside ``jax.shard_map``: a tiled ``all_to_all`` maps a device's [b, L/N, H, d] piece of the
sequence to [b, L/R, H/U, d] (scatter heads, gather sequence: the ring rank's whole block for a
group of heads); the inverse swaps the axes. Its autodiff is the reverse all-to-all, so no
custom_vjp is needed. Segment ids and positions are all-gathered over the same axis in the same
(u) order. Every function here takes and returns per-device blocks (hence ``x_local``, the
package's naming rule for shard_map bodies).

KV heads: when U divides n_kv the KV heads are split as they are (no repetition). Otherwise each
KV head is repeated ``kv_replication(H, n_kv, U)`` = lcm(n_kv, U) / n_kv times before the
exchange (U % n_kv == 0 gives U/n_kv; e.g. Qwen2-7B 28/4 with U = 7 or 14 expands to 28 heads,
U = 28 to 28). The replicas' gradients are summed by the autodiff of ``jnp.repeat``. U must divide
the query heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kv_replication(num_heads: int, num_kv_heads: int, ulysses: int) -> int:
    """How many times each KV head is repeated for a Ulysses degree (1 = no repetition).

    Raises:
      ValueError: if ulysses does not divide num_heads or num_kv_heads does not divide num_heads.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    if num_heads % ulysses:
        raise ValueError(f"ulysses degree {ulysses} must divide num_heads {num_heads}")
    return math.lcm(num_kv_heads, ulysses) // num_kv_heads


def repeat_kv_heads(x_local: jax.Array, times: int) -> jax.Array:
    """[b, t, hkv, d] -> [b, t, hkv*times, d], each head repeated in place (keeps GQA grouping)."""
    return x_local if times == 1 else jnp.repeat(x_local, times, axis=2)


def seq_to_heads(x_local: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
    """[b, t, h, d] local sequence piece -> [b, t*U, h/U, d] local head group (all-to-all)."""
    if axis_size == 1:
        return x_local
    return jax.lax.all_to_all(x_local, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x_local: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
    """Inverse of ``seq_to_heads``: [b, t*U, h/U, d] -> [b, t, h, d]."""
    if axis_size == 1:
        return x_local
    return jax.lax.all_to_all(x_local, axis_name, split_axis=1, concat_axis=2, tiled=True)


def gather_seq(x_local: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
    """[b, t] int metadata (segment ids, positions) -> [b, t*U] in the all-to-all's order."""
    if axis_size == 1:
        return x_local
    return jax.lax.all_gather(x_local, axis_name, axis=1, tiled=True)
