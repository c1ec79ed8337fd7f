"""The fast-step settings of a stage: remat by name in the stage config, scanned layers, a donated
train state.

``StageConfig.remat`` overrides the model config's ``remat`` when the stage resolves (the YAML's
model and an init checkpoint's alike, ``resolve.model_overrides``); a bad name is a
``ConfigError`` naming ``remat``. Remat never changes the numbers (tests/models/
test_remat_policies.py), so it is resume-mutable: a run may resume with another policy, in the
stage or in the model YAML. The jitted step donates the state (its buffers are reused for the
new state) and runs the decoder as one scan over the stacked layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.harness import REPO, TINY_MODEL, stage_dict, write_stage
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.config.base import ConfigError, from_dict
from longvila_jax.config.train import StageConfig, load_stage
from longvila_jax.core.loss import token_ce_sum
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.train.fingerprint import RESUME_MUTABLE, check_resume_config, stage_fingerprint
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.resolve import model_overrides, resolve_stage
from longvila_jax.train.start import forward_template
from longvila_jax.train.state import ModelTemplate, create_state, state_shardings
from longvila_jax.train.step import jit_step, make_train_step


def _stage(corpus: Path, run: Path, **overrides) -> StageConfig:
    return from_dict(StageConfig, stage_dict(corpus, run, **overrides))


def test_stage_remat_overrides_the_model(corpus, tmp_path):
    base = _stage(corpus, tmp_path / "run")
    assert base.remat is None
    assert resolve_stage(base, num_devices=8).model.remat == "none"  # tiny-qwen2.yaml's own
    stage = dataclasses.replace(base, remat="save_attention")
    resolved = resolve_stage(stage, num_devices=8)
    assert resolved.model.remat == "save_attention"
    # The step's template (the model the loss builds) runs the stage's policy.
    assert forward_template(resolved).cfg.remat == "save_attention"
    # It wins over a remat in model_set: it is applied last, as an init checkpoint's config
    # gets it too (train.start.runtime_model applies the same overrides).
    both = dataclasses.replace(stage, model_set=("remat=dots_saveable",))
    assert model_overrides(both)[-1] == "remat=save_attention"
    assert resolve_stage(both, num_devices=8).model.remat == "save_attention"


def test_an_init_checkpoints_config_gets_the_stage_remat(corpus, tmp_path, monkeypatch):
    from longvila_jax.config.base import load_config
    from longvila_jax.config.model import ModelConfig
    from longvila_jax.train import start

    stage = dataclasses.replace(_stage(corpus, tmp_path / "run"), remat="dots_saveable")
    resolved = resolve_stage(stage, num_devices=8)
    seen = {}

    def read_model_config(ckpt, overrides=()):  # the checkpoint's model.yaml, with overrides
        seen["overrides"] = tuple(overrides)
        return load_config(ModelConfig, TINY_MODEL, tuple(overrides))

    monkeypatch.setattr(start.orbax_io, "read_model_config", read_model_config)
    assert start.runtime_model(resolved, tmp_path / "ckpt").remat == "dots_saveable"
    assert seen["overrides"] == model_overrides(stage)


def test_a_bad_remat_name_is_a_config_error_naming_the_field(corpus, tmp_path):
    path = write_stage(tmp_path / "stage.yaml", stage_dict(corpus, tmp_path / "run"))
    assert load_stage(path, ["remat=nothing_saveable"]).remat == "nothing_saveable"
    with pytest.raises(ConfigError) as e:
        load_stage(path, ["remat=full"])
    assert e.value.field == "remat" and "save_attention" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a config built in Python is checked too
        _stage(corpus, tmp_path / "run", remat="everything_but")
    assert e.value.field == "remat"


def test_remat_may_change_on_resume(corpus, tmp_path):
    assert "remat" in RESUME_MUTABLE
    model = tmp_path / "model.yaml"
    model.write_text(Path(TINY_MODEL).read_text())
    base = _stage(corpus, tmp_path / "run", model=str(model))

    def fp(stage):
        return stage_fingerprint(stage, resolve_stage(stage, num_devices=8))

    saved = fp(base)
    for policy in ("nothing_saveable", "save_attention", "dots_saveable"):
        check_resume_config(saved, fp(dataclasses.replace(base, remat=policy)), Path("r"), 4)
    # The model YAML's own remat may change too (it reaches the fingerprint as resolved.model).
    model.write_text(model.read_text().replace("remat: none", "remat: nothing_saveable"))
    check_resume_config(saved, fp(base), Path("r"), 4)
    # Anything else in the resolved model still counts.
    model.write_text(model.read_text().replace("rope_theta: 10000", "rope_theta: 20000"))
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, fp(base), Path("r"), 4)
    assert e.value.field == "resolved.model.llm.rope_theta"


class _TextObjective:
    """A text-only objective on one device: [A, b, T] ids, next-token CE."""

    def __init__(self, mesh):
        self.mesh = mesh

    def shardings(self):
        return {"ids": NamedSharding(self.mesh, P())}

    def loss(self, model, micro):
        ids = micro["ids"]
        hidden = model.llm.hidden(input_ids=ids)
        labels = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], -100)], axis=1)
        return token_ce_sum(model.llm.logits, hidden, labels)


def test_step_donates_its_state_and_scans_the_layers():
    from longvila_jax.config.base import load_config
    from longvila_jax.config.model import ModelConfig
    from longvila_jax.config.train import OptimConfig

    # Three decoder layers: a scan length no other loop of the step has (the tower has two).
    sets = ("remat=save_attention", "llm.num_hidden_layers=3")
    cfg = load_config(ModelConfig, REPO / "configs/model/tiny-qwen2.yaml", sets)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    template = ModelTemplate.build(cfg)
    optimizer = make_optimizer(OptimConfig(lr=1e-3), 4)
    trainable = {n for n in template.names if n.startswith("llm/")}
    rng = np.random.default_rng(0)
    params = {
        n: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype) for n, s in template.shapes.items()
    }
    abstract = jax.eval_shape(lambda p: create_state(p, trainable, optimizer), template.shapes)
    shardings = state_shardings(abstract, template.shardings(mesh, {}), mesh, optimizer)
    state = jax.jit(lambda p: create_state(p, trainable, optimizer), out_shardings=shardings)(
        params
    )
    objective = _TextObjective(mesh)
    step = make_train_step(template, objective, optimizer, make_schedule(OptimConfig(), 4))
    jitted = jit_step(step, shardings, objective.shardings(), mesh)
    batch = {"ids": jnp.asarray(rng.integers(5, 500, (1, 2, 32)), jnp.int32)}

    # The decoder is one scan over its stacked layers, not one block of ops per layer.
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    assert "length=3" in jaxpr and "scan" in jaxpr

    compiled = jitted.lower(state, batch).compile()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    # Every state buffer is aliased to an output buffer (the new state reuses it).
    assert compiled.memory_analysis().alias_size_in_bytes >= state_bytes
    old = jax.tree.leaves(state)
    new_state, metrics = jitted(state, batch)
    assert all(x.is_deleted() for x in old)  # donated: the caller must not touch it again
    assert np.isfinite(float(metrics["loss"])) and int(new_state["step"]) == 1
