"""MM-SP decoding parity: sharded-cache decode on 8 simulated devices vs single-device decode
vs full recomputation without a cache; sampling, stop tokens, the all-gather baseline.

Tiny random fp32 model, two prompt rows of different lengths with 3 and 2 frames, greedy
decoding of 12 tokens (every shard receives appended tokens, some two). Tolerance (issue 6):
identical tokens and fp32 logits within 1e-5 max abs error.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _infer_cases import FAST, max_abs, prompts, recompute_logits, tiny_config
from flax import nnx

from longvila_jax.infer import Generator
from longvila_jax.infer.cache import new_slots_per_shard
from longvila_jax.infer.decode import make_decode_step
from longvila_jax.parallel.mesh import MeshConfig, make_mesh

TOL = 1e-5
NEW = 12


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
    return single.generate_tokens(
        rows, pix, fpr, max_new_tokens=NEW, stop_ids=[], return_logits=True
    )


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
    outs = sharded.generate_tokens(
        rows, pix, fpr, max_new_tokens=NEW, stop_ids=[], return_logits=True
    )
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    _check_against(outs, greedy_single, ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [dict(ring=8), dict(ulysses=8), dict(data=2, ring=2, ulysses=2)], ids=str
)
def test_sharded_decode_other_meshes(tiny, greedy_single, shape):
    model, rows, pix, fpr = tiny
    gen = Generator(model, None, mesh=_mesh(**shape), compiler_options=FAST)
    outs = gen.generate_tokens(rows, pix, fpr, max_new_tokens=NEW, stop_ids=[], return_logits=True)
    ref = recompute_logits(model, rows, pix, fpr, [o.tokens for o in greedy_single])
    _check_against(outs, greedy_single, ref)


def test_gather_baseline_matches(tiny, sharded, greedy_single):
    """The all-gather decode (the benchmark baseline) reproduces the greedy run's logits."""
    model, rows, pix, fpr = tiny
    lp = sharded._layout(rows, fpr)
    inputs = sharded._device_inputs(lp, pix, lp.laid_out_index(lp.lengths[:, None] - 1))
    cache, _ = sharded._prefill(
        sharded.state, *inputs, new_slots=new_slots_per_shard(NEW, sharded.sm.num_shards)
    )
    step = make_decode_step(
        nnx.graphdef(model), sharded.sm, combine="gather", compiler_options=FAST
    )
    tokens = np.stack([o.tokens for o in greedy_single])
    for t in range(3):  # steps 0..2 append to shards 0..2
        cache, lg = step(sharded.state, cache, tokens[:, t], lp.lengths + t, np.int32(t))
        want = np.stack([o.logits[t + 1] for o in greedy_single])
        assert max_abs(lg, want) <= TOL


def test_sampling_reproducible_and_top_p_tiny_is_greedy(tiny, single, greedy_single):
    _, rows, pix, fpr = tiny
    kw = dict(max_new_tokens=NEW, stop_ids=[])
    a = single.generate_tokens(rows, pix, fpr, temperature=1.5, top_p=0.95, seed=7, **kw)
    b = single.generate_tokens(rows, pix, fpr, temperature=1.5, top_p=0.95, seed=7, **kw)
    c = single.generate_tokens(rows, pix, fpr, temperature=1.5, top_p=0.95, seed=8, **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    # A random model is nearly uniform at temperature 1.5: other seeds give other tokens.
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c, strict=True))
    assert any(
        not np.array_equal(x.tokens, g.tokens) for x, g in zip(a, greedy_single, strict=True)
    )
    nucleus = single.generate_tokens(rows, pix, fpr, temperature=1.0, top_p=1e-6, seed=3, **kw)
    for x, g in zip(nucleus, greedy_single, strict=True):
        np.testing.assert_array_equal(x.tokens, g.tokens)


def test_stop_token_ends_generation(tiny, single, greedy_single):
    _, rows, pix, fpr = tiny
    first = greedy_single[0].tokens
    stop = int(first[4])
    k = int(np.flatnonzero(first == stop)[0])  # first occurrence in row 0
    seen = []
    outs = single.generate_tokens(
        rows, pix, fpr, max_new_tokens=NEW, stop_ids=[stop], on_step=seen.append
    )
    np.testing.assert_array_equal(outs[0].tokens, first[: k + 1])
    assert outs[0].finish_reason == "stop"
    g1 = greedy_single[1].tokens
    hit = np.flatnonzero(g1[: len(seen)] == stop)
    if hit.size:  # row 1 stopped too, at its own first stop token
        assert outs[1].finish_reason == "stop" and len(outs[1].tokens) == hit[0] + 1
    else:  # row 1 is cut where generation ended for the batch, or ran to the budget
        np.testing.assert_array_equal(outs[1].tokens, g1[: len(seen)])
    # Generation ends as soon as every row has stopped (or the budget is spent).
    assert len(seen) == NEW or all(o.finish_reason == "stop" for o in outs)


def test_bad_arguments_raise(tiny, single):
    _, rows, pix, fpr = tiny
    with pytest.raises(ValueError, match="top_p"):
        next(single.iter_tokens(rows, pix, fpr, max_new_tokens=2, top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        next(single.iter_tokens(rows, pix, fpr, max_new_tokens=2, temperature=-1.0))
    with pytest.raises(ValueError, match="row 1"):
        next(single.iter_tokens(rows, pix, [3, 3], max_new_tokens=2))
    with pytest.raises(ValueError, match="ulysses degree 3"):
        Generator(tiny[0], None, mesh=_mesh(ulysses=3))
