"""The shared token cross-entropy against a float64 numpy reference, and the ``<image>`` id
lookup (a tokenizer without the token must not map it to its unknown-token id)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.core.loss import token_ce_sum
from longvila_jax.core.tokens import IMAGE_TOKEN, image_token_id


def test_token_ce_sum_matches_float64_reference():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 4)).astype(np.float32)
    head = rng.standard_normal((4, 7)).astype(np.float32)
    labels = np.array([[1, 6, IGNORE_INDEX, 0, 3], [IGNORE_INDEX, 2, 2, -1, 5]], np.int32)
    ce, n = token_ce_sum(lambda h: h @ head, jnp.asarray(hidden), jnp.asarray(labels))
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    want, count = 0.0, 0
    for b, t in zip(*np.nonzero(labels >= 0), strict=True):
        want += lse[b, t] - logits[b, t, labels[b, t]]
        count += 1
    assert float(n) == count == 7
    np.testing.assert_allclose(float(ce), want, rtol=1e-6)


def test_token_ce_sum_of_bf16_logits_is_taken_in_fp32():
    hidden = jnp.ones((1, 2, 3), jnp.bfloat16)
    ce, n = token_ce_sum(
        lambda h: jnp.zeros((*h.shape[:-1], 1000), jnp.bfloat16), hidden, jnp.array([[1, 2]])
    )
    assert ce.dtype == jnp.float32 and float(n) == 2
    np.testing.assert_allclose(float(ce), 2 * np.log(1000.0), rtol=1e-6)


class _Tok:
    def __init__(self, vocab: dict[str, int], unk: int | None):
        self.vocab, self.unk_token_id = vocab, unk

    def convert_tokens_to_ids(self, token: str):
        return self.vocab.get(token, self.unk_token_id)


def test_image_token_id():
    assert image_token_id(_Tok({IMAGE_TOKEN: 7}, unk=0)) == 7
    assert image_token_id(_Tok({}, unk=0)) is None  # unknown -> unk id: not a placeholder
    assert image_token_id(_Tok({}, unk=None)) is None
