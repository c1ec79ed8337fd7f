"""The stage's dtype policy (``train.precision``): fp32 masters and moments, bf16 compute.

The model is tiny-qwen2 stored and computed in bf16 (``model_set``), as the release configs
are. Trained a few steps at lr 1e-5 with the project's step, the default policy (fp32 masters,
bf16 forward/backward) must change the weights as the same step run entirely in fp32 does; the
bf16-master variant (``precision.params: bfloat16``, what the trainer did before) must not.
Also checked: the dtypes of the state, a training checkpoint's round trip, and the dtypes of
``final/`` and of the VILA export.
"""

from __future__ import annotations

import json
import struct

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from helpers import vila_fixture as vf
from helpers.harness import stage_dict

from longvila_jax.ckpt import orbax_io, vila_import
from longvila_jax.config.base import from_dict
from longvila_jax.config.train import CheckpointConfig, StageConfig
from longvila_jax.data.pipeline import DataIterator
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.train.checkpoint import Checkpointer
from longvila_jax.train.finish import FINAL_DIR, VILA_DIR, write_final
from longvila_jax.train.objective import DenseObjective, image_token_id_of
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.resolve import resolve_stage
from longvila_jax.train.start import StateLayout, forward_template
from longvila_jax.train.state import unnest
from longvila_jax.train.step import jit_step, make_train_step

BF16 = ("param_dtype=bfloat16", "compute_dtype=bfloat16")
FP32_REFERENCE = {"params": "float32", "compute": "float32", "frozen": "float32"}
STEPS = 5
LR = 1e-5


def _stage(corpus, run_dir, precision=None, **extra) -> StageConfig:
    d = stage_dict(
        corpus,
        run_dir,
        model_set=list(BF16),
        steps=STEPS,
        optim={"lr": LR, "warmup_steps": 0, "schedule": "constant", "clip_norm": None},
        **extra,
    )
    if precision is not None:
        d["precision"] = precision
    return from_dict(StageConfig, d)


class Run:
    """One stage's layout and jitted step (the pieces ``loop.run_stage`` builds)."""

    def __init__(self, stage: StageConfig):
        self.stage = stage
        self.resolved = resolve_stage(stage, num_devices=8)
        self.mesh = make_mesh(self.resolved.mesh)
        self.template = forward_template(self.resolved)
        self.opt = make_optimizer(stage.optim, stage.steps)
        self.param_sh = self.template.shardings(self.mesh, self.resolved.mesh.param_rules)
        self.layout = StateLayout.of(
            self.resolved, self.template, self.opt, self.param_sh, self.mesh
        )
        self.objective = DenseObjective(self.resolved, self.mesh, image_token_id_of(self.resolved))

    def state(self, masters: dict) -> dict:
        params = jax.device_put(masters, self.param_sh)
        rng = np.zeros((2,), np.uint32)
        return jax.jit(self.layout.build, out_shardings=self.layout.shardings)(params, None, rng)

    def train(self, masters: dict, batches: list) -> tuple[dict, dict]:
        step = make_train_step(
            self.template, self.objective, self.opt, make_schedule(self.stage.optim, STEPS)
        )
        fn = jit_step(step, self.layout.shardings, self.objective.shardings(), self.mesh)
        state = self.state(masters)
        for batch in batches:
            state, m = fn(state, self.objective.to_device(batch))
            assert bool(m["applied"])
        return state, unnest(jax.device_get(state["params"]["trainable"]))


def _masters(run: Run) -> dict:
    """fp32 params whose values bf16 represents exactly (every variant starts from the same
    weights, the bf16 ones included); the layer norms' scales are ones, as initialised."""
    rng = np.random.default_rng(0)
    out = {}
    for n in run.template.names:
        shape = run.template.shapes[n].shape
        x = np.ones(shape) if n.endswith("scale") else 0.05 * rng.standard_normal(shape)
        out[n] = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(masters before, {variant: trainable params after STEPS steps}, the default Run/state)."""
    tmp = tmp_path_factory.mktemp("precision")
    runs = {
        "default": Run(_stage(corpus, tmp / "a")),
        "fp32": Run(_stage(corpus, tmp / "b", precision=FP32_REFERENCE)),
        "bf16_masters": Run(_stage(corpus, tmp / "c", precision={"params": "bfloat16"})),
    }
    it = DataIterator(runs["default"].resolved.data, 0, 1)
    batches = [next(it) for _ in range(STEPS)]
    it.close()
    masters = _masters(runs["default"])
    after, states = {}, {}
    for name, run in runs.items():
        states[name], after[name] = run.train(masters, batches)
    return masters, after, runs, states


# The key biases' true gradient is exactly zero (softmax is shift invariant): their "change" in
# any run is rounding noise that AdamW scales up to ~lr, so they are left out of the comparison.
_NOISE_ONLY = "llm/layers/self_attn/k_proj/bias"


def _delta(masters: dict, after: dict) -> np.ndarray:
    names = sorted(n for n in after if n != _NOISE_ONLY)
    return np.concatenate([(after[n].astype(np.float64) - masters[n]).ravel() for n in names])


def test_fp32_masters_move_like_the_fp32_reference(trained):
    masters, after, _, _ = trained
    ref = _delta(masters, after["fp32"])
    got = _delta(masters, after["default"])
    assert np.abs(ref).max() > 0.5 * LR  # the reference really moves (AdamW: ~lr per entry)
    # The default run differs from the reference only by its bf16 forward/backward: each bf16
    # op rounds to 2^-8 = 0.4 % relative, a handful of roundings deep in each gradient (matmul
    # inputs, activations, the cotangents of the backward), so the gradients are off by ~1-3 %
    # and AdamW's first steps (update ~ g / |g| per entry) pass that on, amplified only where
    # an entry's gradient is itself that small. The fp32 masters add 2^-24 rounding only. The
    # change must match to within 5 % (measured: ~3 %); a lost update is a 100 % error.
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel
    assert rel > 1e-3, rel  # the default run really computes in bf16 (fp32 would match ~exactly)
    moved = ref != 0  # rows of the embedding no batch token uses get no gradient at all
    assert np.mean(got[moved] != 0) > 0.999


def test_bf16_masters_lose_the_updates(trained):
    masters, after, _, _ = trained
    ref = _delta(masters, after["fp32"])
    got = _delta(masters, after["bf16_masters"])
    # |W| ~ 0.05 has a bf16 spacing of 2^-12 ~ 2.4e-4 and the scales (1.0) 2^-7, far above a
    # 1e-5 update: the update rounds back to the old value, so almost no entry moves at all
    # (only weights near zero, where bf16's spacing is finer; measured ~6 %), and the change
    # is nearly all error.
    moved = ref != 0
    assert np.mean(got[moved] != 0) < 0.1, np.mean(got[moved] != 0)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) > 0.9


def test_state_dtypes(trained):
    _, _, runs, states = trained
    state = states["default"]
    f32, bf16 = np.dtype("float32"), np.dtype(ml_dtypes.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(state["params"]["trainable"])} == {f32}
    assert {x.dtype for x in jax.tree.leaves(state["params"]["frozen"])} == {bf16}
    for moment in ("mu", "nu"):
        leaves = jax.tree.leaves(optax.tree_utils.tree_get(state["opt"], moment))
        assert leaves and {x.dtype for x in leaves} == {f32}
    # The template the step builds computes in bf16 (the model's compute_dtype) ...
    assert runs["default"].template.cfg.compute_dtype == "bfloat16"
    # ... and precision.compute overrides it, the stored params' dtype staying bf16.
    ref = runs["fp32"].template
    assert ref.cfg.compute_dtype == "float32" and ref.cfg.param_dtype == "bfloat16"
    ref_state = states["fp32"]
    assert {x.dtype for x in jax.tree.leaves(ref_state["params"]["frozen"])} == {f32}
    low = states["bf16_masters"]
    assert {x.dtype for x in jax.tree.leaves(low["params"]["trainable"])} == {bf16}
    assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(low["opt"], "mu"))} == {bf16}


def test_lora_adapters_are_fp32_masters(corpus, tmp_path):
    stage = _stage(
        corpus,
        tmp_path,
        trainable=["llm/.*norm.*"],
        lora={"rank": 4, "alpha": 8, "targets": ["llm/layers/self_attn/q_proj/kernel"]},
    )
    abstract = Run(stage).layout.abstract
    f32 = np.dtype("float32")
    assert {x.dtype for x in jax.tree.leaves(abstract["lora"])} == {f32}
    assert {x.dtype for x in jax.tree.leaves(abstract["params"]["trainable"])} == {f32}
    q = unnest(abstract["params"]["frozen"])["llm/layers/self_attn/q_proj/kernel"]
    assert q.dtype == np.dtype(ml_dtypes.bfloat16)


def test_training_checkpoint_keeps_the_fp32_state_bitwise(trained, tmp_path):
    _, _, runs, states = trained
    run, state = runs["default"], states["default"]
    it = DataIterator(run.resolved.data, 0, 1)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(every=1, keep=2))
    try:
        ck.save(STEPS, state, it, {"step": STEPS})
        ck.wait()
        restored, _ = ck.restore(STEPS, run.layout.restore_target(), it)
    finally:
        ck.close()
        it.close()
    a, b = jax.device_get(state), jax.device_get(restored)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path


def _safetensors_dtypes(folder) -> set[str]:
    """The dtypes in the headers of every safetensors file under ``folder`` (read by hand)."""
    out = set()
    for f in folder.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


def test_final_checkpoint_and_vila_export_are_bf16(tmp_path):
    """fp32 masters -> final/ in the model's param_dtype (round to nearest), vila/ in bf16."""
    spec = vf.Spec(dtype=torch.bfloat16, projector_type="mlp_downsample", layers=2)
    src = vf.build_vila(tmp_path / "src", spec)
    ckpt = tmp_path / "imported"
    vila_import.import_vila(src, ckpt)
    cfg, params = orbax_io.load_checkpoint(ckpt, dtype="float32")
    assert cfg.param_dtype == "bfloat16"
    rng = np.random.default_rng(1)
    # Trained fp32 masters: the imported weights plus updates below bf16's resolution.
    flat = {
        n: np.asarray(v) * np.float32(1 + 1e-3 * rng.standard_normal(v.shape))
        for n, v in unnest(params).items()
    }
    run = tmp_path / "run"
    run.mkdir()
    write_final(run / FINAL_DIR, cfg, flat, ckpt, export_tokenizer=tmp_path)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    stored = unnest(orbax_io.stored_tree(run / FINAL_DIR))
    assert {dtype for _, dtype in stored.values()} == {bf16}
    final = unnest(orbax_io.load_params(run / FINAL_DIR))
    for n, v in flat.items():
        want = v.astype(bf16)  # ml_dtypes rounds to nearest even, as XLA's convert does
        assert final[n].dtype == bf16 and np.array_equal(np.asarray(final[n]), want), n
    assert _safetensors_dtypes(run / VILA_DIR) == {"BF16"}
