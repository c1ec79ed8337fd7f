"""The token cross-entropy every training objective computes, written once.

An objective returns the *sum* of token cross-entropies and the *number* of supervised tokens,
never their mean: the train step divides the sums over all micro-batches and devices, which gives
the global token mean of issue 5 whatever the sharding, the packing or the accumulation. The
dense objective (``train.objective``) calls :func:`token_ce_sum` on whole rows; the MM-SP plan
(``parallel.mmsp``) calls it on one chunk of a device's tokens at a time and psums the results.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_ce_sum(
    logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of the cross-entropies of the supervised tokens of a block, and their number.

    Args:
      logits_fn: the LM head, [..., D] -> [..., V] logits (any float dtype: they are cast to
        fp32 here, so the log-sum-exp is always taken in fp32).
      hidden: [B, L, D] final hidden states (any block of tokens: whole rows or one chunk).
      labels: [B, L] int targets, already shifted; a token is supervised when its label is
        >= 0 (``core.labels.IGNORE_INDEX`` and every other negative value mean "no target").

    Returns:
      (ce_sum, n_tokens): fp32 scalars.
    """
    logits = logits_fn(hidden).astype(jnp.float32)
    supervised = labels >= 0
    # Unsupervised tokens look up class 0 so the gather stays in range; their CE is zeroed below.
    target = jnp.where(supervised, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    ce = jnp.where(supervised, lse - picked, 0.0)
    return ce.sum(), supervised.sum().astype(jnp.float32)


__all__ = ["token_ce_sum"]
