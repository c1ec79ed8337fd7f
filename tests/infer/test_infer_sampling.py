"""Next-token sampling: greedy, temperature and top-p against exact distributions.

Empirical frequencies of 40,000 draws are compared with the analytic target distribution
(tolerance 0.015 absolute: about 5 standard errors at p = 0.5), and tokens outside the nucleus
must never appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longvila_jax.infer.sampling import (
    SamplingParams,
    check_sampling,
    nucleus_mask,
    sample_logits,
    step_key,
)

DRAWS = 40_000
FREQ_TOL = 0.015
SAMPLE = jax.jit(sample_logits)  # one compilation per shape; the settings are traced


def _freqs(logits: np.ndarray, temperature: float, top_p: float, seed: int = 0) -> np.ndarray:
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (DRAWS, len(logits)))
    draws = SAMPLE(rows, step_key(seed, 0), temperature, top_p)
    return np.bincount(np.asarray(draws), minlength=len(logits)) / DRAWS


def test_temperature_zero_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (16, 100))
    greedy = np.asarray(jnp.argmax(logits, -1))
    for temp, top_p in ((0.0, 1.0), (0.0, 0.3), (1.0, 1e-6), (3.0, 1e-6)):
        got = SAMPLE(logits, step_key(1, 2), temp, top_p)
        np.testing.assert_array_equal(np.asarray(got), greedy)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_nucleus_samples_the_tempered_softmax(temperature):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    want = np.asarray(jax.nn.softmax(jnp.asarray(logits) / temperature))
    got = _freqs(logits, temperature, 1.0)
    assert np.max(np.abs(got - want)) < FREQ_TOL


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    # top_p = 0.6: 0.5 < 0.6 needs the second token; 0.8 >= 0.6 stops there.
    got = _freqs(np.log(probs), 1.0, 0.6)
    assert got[2] == 0 and got[3] == 0
    np.testing.assert_allclose(got[:2], [0.5 / 0.8, 0.3 / 0.8], atol=FREQ_TOL)
    # top_p = 0.5 exactly: the first token alone reaches it.
    assert _freqs(np.log(probs), 1.0, 0.5)[0] == 1.0
    # top_p = 0.85: three tokens (0.5 + 0.3 = 0.8 < 0.85).
    got = _freqs(np.log(probs), 1.0, 0.85)
    assert got[3] == 0
    np.testing.assert_allclose(got[:3], probs[:3] / 0.95, atol=FREQ_TOL)


def test_nucleus_mask_is_per_row_and_order_free():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    mask = np.asarray(nucleus_mask(logits, 0.6))
    np.testing.assert_array_equal(mask[0], [False, True, False, True])
    np.testing.assert_array_equal(mask[1], [True] * 4)  # ties with the cutoff are kept


def test_same_seed_same_draws_other_seed_other_draws():
    logits = jax.random.normal(jax.random.key(3), (16, 100))
    a = SAMPLE(logits, step_key(5, 9), 1.0, 0.9)
    b = SAMPLE(logits, step_key(5, 9), 1.0, 0.9)
    c = SAMPLE(logits, step_key(6, 9), 1.0, 0.9)
    d = SAMPLE(logits, step_key(5, 10), 1.0, 0.9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(d))


@pytest.mark.parametrize(
    "temperature,top_p,match",
    [(-0.1, 1.0, "temperature"), (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p"), (np.nan, 1, "temp")],
)
def test_bad_settings_raise(temperature, top_p, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(temperature, top_p)


def test_sampling_params_are_checked_when_built():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    params = SamplingParams(stop=[5, "</s>"])  # a list (as argparse gives) is kept as a tuple
    assert params.stop == (5, "</s>") and hash(params) == hash(SamplingParams(stop=(5, "</s>")))
