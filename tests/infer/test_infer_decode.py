"""MM-SP decoding parity: sharded-cache decode on 8 simulated devices vs single-device decode
vs full recomputation without a cache; sampling, stop tokens, the all-gather baseline, all
through the public ``Generator`` API.

Tiny random fp32 model, two prompt rows of different lengths with 3 and 2 frames, greedy
decoding of 12 tokens (every shard receives appended tokens, some two). Tolerance (issue 6):
identical tokens and fp32 logits within 1e-5 max abs error.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.infer_cases import FAST, max_abs, prompts, recompute_logits, tiny_config

from longvila_jax.infer import Generator, SamplingParams
from longvila_jax.parallel.mesh import MeshConfig, make_mesh

TOL = 1e-5
NEW = 12
BUDGET = SamplingParams(max_new_tokens=NEW)  # greedy


def _mesh(data=1, ring=1, ulysses=1):
    return make_mesh(
        MeshConfig(data=data, ring=ring, ulysses=ulysses), jax.devices()[: data * ring * ulysses]
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    model = _build(cfg)
    rows, pix, fpr = prompts(cfg)
    return model, rows, pix, fpr


def _build(cfg):
    from longvila_jax.models.vlm import LongVILA

    return LongVILA(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def single(tiny):
    model = tiny[0]
    return Generator(model, None, mesh=_mesh(), compiler_options=FAST)


@pytest.fixture(scope="module")
def greedy_single(tiny, single):
    _, rows, pix, fpr = tiny
    return single.generate_tokens(rows, pix, fpr, sampling=BUDGET, stop_ids=[], return_logits=True)


def _check_against(outs, ref_outs, ref_logits):
    for b, out in enumerate(outs):
        assert out.finish_reason == "length" and len(out.tokens) == NEW
        np.testing.assert_array_equal(out.tokens, ref_outs[b].tokens)
        assert max_abs(out.logits, ref_logits[b]) <= TOL
        assert max_abs(out.logits, ref_outs[b].logits) <= TOL


def test_single_device_decode_matches_recompute(tiny, greedy_single):
    model, rows, pix, fpr = tiny
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    for b, out in enumerate(greedy_single):
        np.testing.assert_array_equal(out.tokens, ref[b].argmax(-1))
        assert max_abs(out.logits, ref[b]) <= TOL
    # The prompts must not collapse to one repeated token, or token equality proves little.
    assert all(len(set(o.tokens.tolist())) > 3 for o in greedy_single)


@pytest.fixture(scope="module")
def sharded(tiny):
    return Generator(tiny[0], None, mesh=_mesh(ring=2, ulysses=4), compiler_options=FAST)


def test_sharded_decode_matches_single_device_and_recompute(tiny, sharded, greedy_single):
    model, rows, pix, fpr = tiny
    outs = sharded.generate_tokens(rows, pix, fpr, sampling=BUDGET, stop_ids=[], return_logits=True)
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    _check_against(outs, greedy_single, ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [dict(ring=8), dict(ulysses=8), dict(data=2, ring=2, ulysses=2)], ids=str
)
def test_sharded_decode_other_meshes(tiny, greedy_single, shape):
    model, rows, pix, fpr = tiny
    gen = Generator(model, None, mesh=_mesh(**shape), compiler_options=FAST)
    outs = gen.generate_tokens(rows, pix, fpr, sampling=BUDGET, stop_ids=[], return_logits=True)
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    _check_against(outs, greedy_single, ref)


def test_gather_baseline_matches(tiny, greedy_single):
    """The all-gather decode (the benchmark baseline) reproduces the greedy run."""
    model, rows, pix, fpr = tiny
    gen = Generator(
        model, None, mesh=_mesh(ring=2, ulysses=4), combine="gather", compiler_options=FAST
    )
    outs = gen.generate_tokens(rows, pix, fpr, sampling=BUDGET, stop_ids=[], return_logits=True)
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    _check_against(outs, greedy_single, ref)


def test_sampling_reproducible_and_top_p_tiny_is_greedy(tiny, single, greedy_single):
    _, rows, pix, fpr = tiny

    def sample(**settings):
        sampling = SamplingParams(max_new_tokens=NEW, **settings)
        return single.generate_tokens(rows, pix, fpr, sampling=sampling, stop_ids=[])

    a = sample(temperature=1.5, top_p=0.95, seed=7)
    b = sample(temperature=1.5, top_p=0.95, seed=7)
    c = sample(temperature=1.5, top_p=0.95, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    # A random model is nearly uniform at temperature 1.5: other seeds give other tokens.
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c, strict=True))
    assert any(
        not np.array_equal(x.tokens, g.tokens) for x, g in zip(a, greedy_single, strict=True)
    )
    nucleus = sample(temperature=1.0, top_p=1e-6, seed=3)
    for x, g in zip(nucleus, greedy_single, strict=True):
        np.testing.assert_array_equal(x.tokens, g.tokens)


def test_stop_tokens_end_each_row_and_then_the_batch(tiny, single, greedy_single):
    _, rows, pix, fpr = tiny
    greedy = [o.tokens for o in greedy_single]
    # One stop id taken from each row's greedy output, early: both rows stop within 4 tokens.
    stops = [int(greedy[0][2]), int(greedy[1][3])]
    ends = [int(np.flatnonzero(np.isin(g, stops))[0]) + 1 for g in greedy]  # stop included
    seen = []
    outs = single.generate_tokens(
        rows, pix, fpr, sampling=BUDGET, stop_ids=stops, on_step=seen.append
    )
    for out, tokens, end in zip(outs, greedy, ends, strict=True):
        np.testing.assert_array_equal(out.tokens, tokens[:end])
        assert out.finish_reason == "stop"
    # Generation ends as soon as every row has stopped, well before the budget.
    assert len(seen) == max(ends) < NEW


def test_a_row_that_never_stops_runs_to_the_budget(tiny, single, greedy_single):
    _, rows, pix, fpr = tiny
    greedy = [o.tokens for o in greedy_single]
    only_first = [int(t) for t in greedy[0] if t not in greedy[1]]
    assert only_first, "pick another model seed: row 0 shares every token with row 1"
    end = int(np.flatnonzero(greedy[0] == only_first[0])[0]) + 1
    seen = []
    outs = single.generate_tokens(
        rows, pix, fpr, sampling=BUDGET, stop_ids=only_first[:1], on_step=seen.append
    )
    np.testing.assert_array_equal(outs[0].tokens, greedy[0][:end])
    np.testing.assert_array_equal(outs[1].tokens, greedy[1])
    assert [o.finish_reason for o in outs] == ["stop", "length"] and len(seen) == NEW


def test_bad_arguments_raise(tiny, single):
    _, rows, pix, fpr = tiny
    with pytest.raises(ValueError, match="row 1"):
        next(single.iter_tokens(rows, pix, [3, 3], sampling=BUDGET))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        single.generate_tokens(rows, pix, fpr, sampling=SamplingParams(stop=("</s>",)))
    with pytest.raises(ValueError, match="ulysses degree 3"):
        Generator(tiny[0], None, mesh=_mesh(ulysses=3))
