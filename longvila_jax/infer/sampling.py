"""Next-token selection: greedy, temperature and nucleus (top-p) sampling, on device, and the
:class:`SamplingParams` of a request.

``temperature`` and ``top_p`` are traced scalars, so changing them never recompiles: a
temperature of 0 selects greedy decoding through ``lax.cond`` (the sort needed by top-p is then
not executed). Randomness is a pure function of (seed, step), so a run is reproducible.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_p: float) -> None:
    """Raises ValueError naming the argument when a sampling setting is out of range."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the tokens of one generation request are chosen and when generation stops.

    Checked when built (``ValueError`` naming the field), so a bad setting fails before any
    video is decoded or anything is compiled.

    Attributes:
      max_new_tokens: generation budget, >= 1 (the stop token counts).
      temperature: 0 = greedy (argmax); otherwise the logits are divided by it.
      top_p: nucleus mass in (0, 1]; 1 disables the cut.
      seed: PRNG seed; the same seed and inputs give the same tokens.
      stop: extra stop tokens (ids, or strings that are one token each) besides the chat
        template's end token and the tokenizer's EOS; a list is stored as a tuple.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[int | str, ...] = ()

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))  # frozen: the one normalisation


GREEDY = SamplingParams()  # the default: greedy decoding of up to 128 tokens


def nucleus_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Tokens inside the top-p nucleus of ``softmax(logits)``.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always in it); tokens tied with the least likely member are kept.

    Args:
      logits: [B, V] fp32 (already divided by the temperature).
      top_p: scalar in (0, 1].

    Returns:
      [B, V] bool.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return logits >= cutoff


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Picks the next token of every row.

    Args:
      logits: [B, V] fp32 next-token logits.
      key: PRNG key for this step.
      temperature: scalar; 0 = greedy (argmax), else logits are divided by it.
      top_p: scalar in (0, 1]; 1 disables the nucleus cut.

    Returns:
      [B] int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        masked = jnp.where(nucleus_mask(scaled, top_p), scaled, -jnp.inf)
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy)


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The PRNG key of decode step ``step`` of a run seeded with ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), step)


__all__ = [
    "GREEDY",
    "SamplingParams",
    "check_sampling",
    "nucleus_mask",
    "sample_logits",
    "step_key",
]
