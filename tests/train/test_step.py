"""The jitted train step: trainable/frozen split, token-mean accumulation, non-finite guard.

Real batches come from the data pipeline on the synthetic corpus; the model is tiny-qwen2 on 8
simulated CPU devices (ring 2 x ulysses 4 mesh, dense objective).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.harness import stage_dict

from longvila_jax.config.base import from_dict
from longvila_jax.config.train import CheckpointConfig, StageConfig
from longvila_jax.data.pipeline import DataIterator
from longvila_jax.models.vlm import expand_prompts
from longvila_jax.parallel.layouts import expand_packed_rows
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.train.checkpoint import Checkpointer, NonFiniteState
from longvila_jax.train.objective import DenseObjective, image_token_id_of
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.resolve import resolve_stage
from longvila_jax.train.state import ModelTemplate, create_state, state_shardings, unnest
from longvila_jax.train.step import jit_step, make_train_step


def _params(template: ModelTemplate, seed: int = 0) -> dict:
    """Cheap host-side random params (the step's mechanics do not depend on the init)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in template.names:
        s = template.shapes[n]
        if n.endswith("scale"):
            out[n] = np.ones(s.shape, s.dtype)
        else:
            out[n] = (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
    return out


class Setup:
    def __init__(self, corpus, tmp_path, trainable=("projector/.*",), accum=1, eps=1e-8, lr=1e-2):
        data = stage_dict(
            corpus,
            tmp_path / "run",
            trainable=list(trainable),
            optim={"lr": lr, "warmup_steps": 0, "grad_accum": accum, "clip_norm": None, "eps": eps},
        )
        self.stage = from_dict(StageConfig, data)
        self.resolved = resolve_stage(self.stage, num_devices=8)
        self.mesh = make_mesh(self.resolved.mesh)
        self.template = ModelTemplate.build(self.resolved.model)
        self.opt = make_optimizer(self.stage.optim, self.stage.steps)
        self.param_sh = self.template.shardings(self.mesh, self.resolved.mesh.param_rules)
        self.trainable = set(self.resolved.trainable_paths)
        self.image_id = image_token_id_of(self.resolved)

        def build(p):
            return create_state(p, self.trainable, self.opt)

        abstract = jax.eval_shape(build, dict(self.template.shapes))
        self.state_sh = state_shardings(abstract, self.param_sh, self.mesh, self.opt)
        self._build = jax.jit(build, out_shardings=self.state_sh)
        self._dense = DenseObjective(self.resolved, self.mesh, self.image_id)
        self._fns: dict = {}

    def state(self):
        return self._build(jax.device_put(_params(self.template), self.param_sh))

    def objective(self):
        return self._dense

    def step_fn(self, objective):
        if id(objective) not in self._fns:
            step = make_train_step(
                self.template,
                objective,
                self.opt,
                make_schedule(self.stage.optim, self.stage.steps),
            )
            self._fns[id(objective)] = jit_step(
                step, self.state_sh, objective.shardings(), self.mesh
            )
        return self._fns[id(objective)]

    def batch(self):
        it = DataIterator(self.resolved.data, 0, 1)
        b = next(it)
        it.close()
        return b


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_same(a, b, what):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(la) == len(lb)
    for (pa, xa), (_, xb) in zip(la, lb, strict=True):
        assert xa.dtype == xb.dtype and xa.shape == xb.shape, f"{what} {pa}"
        assert xa.tobytes() == xb.tobytes(), f"{what} {pa} changed"


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
    return Setup(corpus, tmp_path_factory.mktemp("step"))


def test_only_trainable_params_move_and_carry_optimizer_state(setup):
    state = setup.state()
    obj = setup.objective()
    fn = setup.step_fn(obj)
    before = _host(state)
    state, m = fn(state, obj.to_device(setup.batch()))
    after = _host(state)
    assert bool(m["applied"]) and np.isfinite(float(m["loss"]))
    _assert_same(before["params"]["frozen"], after["params"]["frozen"], "frozen")
    moved = [
        n
        for n, v in unnest(after["params"]["trainable"]).items()
        if not np.array_equal(v, unnest(before["params"]["trainable"])[n])
    ]
    assert set(moved) == setup.trainable  # every trainable leaf got an update
    mu = optax.tree_utils.tree_get(after["opt"], "mu")
    assert set(unnest(mu["params"])) == setup.trainable
    n_arrays = sum(x.ndim > 0 for x in jax.tree.leaves(after["opt"]))
    assert n_arrays == 2 * len(setup.trainable)  # Adam mu + nu, nothing for frozen params
    assert int(m["applied"]) == 1 and int(after["counters"]["applied"]) == 1


def test_nan_pixels_skip_the_update_bitwise(setup):
    state = setup.state()
    obj = setup.objective()
    fn = setup.step_fn(obj)
    batch = setup.batch()
    assert batch["frame_mask"].any(), "the batch must hold frames"
    nan = np.where(batch["frame_mask"][..., None, None, None], np.nan, batch["frames"])
    bad = dict(batch, frames=nan.astype(np.float32))
    before = _host(state)
    state, m = fn(state, obj.to_device(bad))
    after = _host(state)
    assert not bool(m["finite"]) and not bool(m["applied"])
    for key in ("params", "opt"):
        _assert_same(before[key], after[key], key)
    assert int(after["counters"]["nonfinite"]) == 1
    assert int(after["counters"]["consecutive_nonfinite"]) == 1
    assert int(after["step"]) == 1
    state, m = fn(state, obj.to_device(batch))  # a good step resets the streak
    assert bool(m["applied"]) and int(m["consecutive_nonfinite"]) == 0 and int(m["nonfinite"]) == 1


@jax.custom_vjp
def _nan_grad(x):
    return x


_nan_grad.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))


class _PoisonedGrad(DenseObjective):
    """Finite loss, NaN gradient in one leaf (the projector's fc1 bias)."""

    def loss(self, model, micro):
        ce, n = super().loss(model, micro)
        poison = jnp.sum(_nan_grad(model.projector.fc1.bias[...])) * 0.0
        return ce + poison, n


def test_nan_in_one_gradient_leaf_skips_the_update(setup):
    state = setup.state()
    obj = _PoisonedGrad(setup.resolved, setup.mesh, setup.image_id)
    fn = setup.step_fn(obj)
    before = _host(state)
    for i in range(3):
        state, m = fn(state, obj.to_device(setup.batch()))
        assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
        assert not bool(m["applied"]) and int(m["consecutive_nonfinite"]) == i + 1
    after = _host(state)
    for key in ("params", "opt"):
        _assert_same(before[key], after[key], key)


@pytest.mark.slow
def test_grad_accumulation_is_the_global_token_mean(corpus, tmp_path):
    """2 micro-batches of 1 row == 1 batch of 2 rows (token mean over both, not mean of means).

    Adam's eps is huge here so the first update is linear in the gradient (lr * g / eps): the
    parameter deltas then compare the accumulated gradients themselves (lr is large so that the
    deltas stand far above the rounding of the parameters they are added to).
    """
    one = Setup(corpus, tmp_path / "a", trainable=(".*",), accum=1, eps=1e3, lr=100.0)
    two = Setup(corpus, tmp_path / "b", trainable=(".*",), accum=2, eps=1e3, lr=100.0)
    batch = one.batch()
    tokens = (batch["labels"] >= 0).sum(axis=1)
    assert tokens[0] != tokens[1], "rows need different token counts for this test to bite"
    results = []
    for s in (one, two):
        state = s.state()
        p0 = unnest(_host(state["params"]["trainable"]))
        obj = s.objective()
        state, m = s.step_fn(obj)(state, obj.to_device(batch))
        p = unnest(_host(state["params"]["trainable"]))
        results.append((_host(m), {n: p[n] - p0[n] for n in p}))
    (m1, d1), (m2, d2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert float(m1["tokens"]) == float(m2["tokens"]) == float(tokens.sum())
    moved = 0
    for n, v in d1.items():
        # Key biases get an exactly zero gradient (softmax is shift invariant): scale 0 there.
        scale = float(np.abs(v).max())
        moved += scale > 0
        np.testing.assert_allclose(v, d2[n], rtol=1e-4, atol=1e-4 * scale + 1e-12, err_msg=n)
    assert moved >= len(d1) - 2


def test_expand_packed_rows_matches_expand_prompts(setup):
    """Splice indices of pipeline rows == the model's ``expand_prompts`` on the same text."""
    batch = setup.batch()
    tpf = setup.resolved.model.tokens_per_frame
    text_ids, visual = expand_packed_rows(batch, setup.image_id, tpf)
    for r in range(batch["input_ids"].shape[0]):
        real = batch["text_to_expanded"][r] < text_ids.shape[1]
        ids = batch["input_ids"][r][real][None]
        n = int((ids == setup.image_id).sum())
        ex = expand_prompts(
            ids,
            num_frames=n,
            image_token_id=setup.image_id,
            tokens_per_frame=tpf,
            vocab_size=setup.resolved.model.llm.vocab_size,
        )
        length = ex.text_ids.shape[1]
        np.testing.assert_array_equal(text_ids[r, :length], ex.text_ids[0])
        np.testing.assert_array_equal(visual[r, :length], ex.visual_index[0])
        assert (visual[r, length:] == -1).all()


def test_nonfinite_state_is_never_committed(setup, tmp_path):
    state = setup.state()
    it = DataIterator(setup.resolved.data, 0, 1)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(every=1, keep=2))
    try:
        ck.save(1, state, it, {"step": 1})
        ck.wait()
        name = sorted(unnest(state["params"]["trainable"]))[0]
        flat = unnest(state["params"]["trainable"])
        flat[name] = flat[name].at[(0,) * flat[name].ndim].set(jnp.inf)
        from longvila_jax.train.state import nest

        bad = dict(state, params=dict(state["params"], trainable=nest(flat)))
        with pytest.raises(NonFiniteState):
            ck.save(2, bad, it, {"step": 2})
        ck.wait()
        assert ck.latest_step() == 1
        assert not (tmp_path / "ck" / "2").exists()
        assert not list((tmp_path / "ck").glob("2.*"))
    finally:
        ck.close()
        it.close()


class _NanLoss(DenseObjective):
    """Every step's loss is NaN (as after a blow-up)."""

    def loss(self, model, micro):
        ce, n = super().loss(model, micro)
        return ce * jnp.nan, n


@pytest.mark.slow
def test_k_consecutive_nonfinite_steps_halt_the_run(corpus, tmp_path):
    from longvila_jax.train.loop import EXIT_NONFINITE, run_stage
    from longvila_jax.train.metrics import read_metrics

    data = stage_dict(corpus, tmp_path / "run", steps=6, max_consecutive_nonfinite=3)
    data["checkpoint"] = {"every": 2, "keep": 2}
    stage = from_dict(StageConfig, data)

    def factory(resolved, mesh):
        return _NanLoss(resolved, mesh, image_token_id_of(resolved))

    code = run_stage(stage, progress=False, objective_factory=factory)
    assert code == EXIT_NONFINITE
    recs = read_metrics(tmp_path / "run")
    assert sorted(recs) == [1, 2, 3]
    assert [r["consecutive_nonfinite"] for r in recs.values()] == [1, 2, 3]
    assert not any(r["applied"] for r in recs.values())
    assert not (tmp_path / "run" / "final").exists()
    # The only commit (step 2) holds the untouched, finite state.
    committed = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert committed == ["2"]
