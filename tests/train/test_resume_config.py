"""Resuming a run directory with a different stage config raises, naming what differs.

Each checkpoint's ``meta`` holds the stage fingerprint (every stage field except
``RESUME_MUTABLE``). The unit tests compare fingerprints of edited configs. The CLI test plants a
checkpoint written under one config and reruns the trainer command with another; it must fail
with a config error (exit 2) naming the field before anything is compiled, and leave the run's
``stage.yaml`` alone. The fingerprint also holds what the referenced files resolved to (model
and data configs) and the mesh sizes, so an edited model YAML under the same path or a CLI
``--mesh`` override is refused too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import pytest
from helpers.harness import REPO, TINY_MODEL, stage_dict, write_stage

from longvila_jax.config.base import ConfigError, from_dict, to_dict
from longvila_jax.config.train import StageConfig, UpstreamRecipe
from longvila_jax.train.checkpoint import Checkpointer
from longvila_jax.train.fingerprint import (
    RESUME_MUTABLE,
    check_resume_config,
    stage_fingerprint,
)
from longvila_jax.train.loop import EXIT_CONFIG
from longvila_jax.train.resolve import resolve_stage


def _stage(corpus: Path, run: Path, **overrides) -> StageConfig:
    return from_dict(StageConfig, stage_dict(corpus, run, **overrides))


def _refusal(saved: StageConfig, now: StageConfig) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        check_resume_config(stage_fingerprint(saved), stage_fingerprint(now), Path("run"), 4)
    return e.value


def test_changed_fields_are_named_with_both_values(corpus, tmp_path):
    base = _stage(corpus, tmp_path / "run")
    lr = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=2.0e-3))
    err = _refusal(base, lr)
    assert err.field == "optim.lr"
    assert "optim.lr = 0.001" in str(err) and "now has 0.002" in str(err)

    err = _refusal(base, dataclasses.replace(base, trainable=("projector/.*",)))
    assert err.field == "trainable"
    assert "'projector/.*', 'llm/.*'" in str(err) and "['projector/.*']" in str(err)

    both = dataclasses.replace(lr, seed=7, steps=base.steps + 4)
    err = _refusal(base, both)
    assert err.field == "optim.lr"
    assert "also differs: seed, steps" in str(err)

    # A fingerprint from a checkpoint without one (or a foreign meta) is refused as a whole.
    with pytest.raises(ConfigError, match="<stage>"):
        check_resume_config(None, stage_fingerprint(base), Path("run"), 4)


def test_bookkeeping_fields_may_change_on_resume(corpus, tmp_path):
    base = _stage(corpus, tmp_path / "run", tensorboard=False)
    changed = dataclasses.replace(
        base,
        log_every=5,
        tensorboard=True,
        export_vila=True,
        checkpoint=dataclasses.replace(base.checkpoint, async_save=False),
        run_dir=str(tmp_path / "moved"),
        upstream=UpstreamRecipe(samples_per_step=146.29, lr=2e-5, script="upstream.sh"),
    )
    assert set(RESUME_MUTABLE) == {
        "log_every",
        "tensorboard",
        "export_vila",
        "checkpoint.async_save",
        "run_dir",
        "data.inline.fail_fast",
        "upstream",
        "remat",
    }
    check_resume_config(stage_fingerprint(base), stage_fingerprint(changed), Path("run"), 4)
    # A checkpoint written before DataConfig had ``fail_fast`` (the key absent) resumes too.
    old = to_dict(base)
    del old["data"]["inline"]["fail_fast"]
    check_resume_config(old, stage_fingerprint(changed), Path("run"), 4)
    # Checkpoints written when these fields were still fingerprinted resume too.
    check_resume_config(to_dict(base), stage_fingerprint(changed), Path("run"), 4)


def test_file_contents_and_mesh_override_count(corpus, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(Path(TINY_MODEL).read_text())
    base = _stage(corpus, tmp_path / "run", model=str(model))

    def fp(**kw):
        return stage_fingerprint(base, resolve_stage(base, num_devices=8, **kw))

    saved = fp()
    check_resume_config(saved, fp(), Path("run"), 4)
    # Checkpoints written before the fingerprint held the resolved contents still resume.
    check_resume_config(stage_fingerprint(base), saved, Path("run"), 4)

    model.write_text(model.read_text().replace("rope_theta: 10000", "rope_theta: 500000"))
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, fp(), Path("run"), 4)
    assert e.value.field == "resolved.model.llm.rope_theta"
    assert "10000" in str(e.value) and "500000" in str(e.value)

    model.write_text(Path(TINY_MODEL).read_text())
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, fp(mesh_path=str(REPO / "configs/mesh/cpu8_r8.yaml")), "r", 4)
    assert e.value.field == "resolved.mesh.ring"
    assert "also differs: resolved.mesh.ulysses" in str(e.value)


class _Iter:
    def get_state(self) -> dict:
        return {"pos": 0}


def test_cli_refuses_a_run_dir_written_by_another_config(corpus, tmp_path, capsys):
    from longvila_jax.train.__main__ import main

    run = tmp_path / "run"
    old = _stage(corpus, run)
    ck = Checkpointer(run / "checkpoints", old.checkpoint)
    try:
        meta = {"step": 2, "stage": stage_fingerprint(old), "skips": {}}
        ck.save(2, {"x": jnp.zeros(2)}, _Iter(), meta)
        ck.wait()
    finally:
        ck.close()
    cfg = write_stage(
        tmp_path / "stage.yaml",
        stage_dict(
            corpus, run, trainable=["projector/.*"], optim={"lr": 1.0e-3, "warmup_steps": 1}
        ),
    )
    assert main(["--config", str(cfg), "--no-progress"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "config error: trainable:" in err
    assert f"{run}: checkpoint 2 was written with trainable" in err
    assert not (run / "final").exists()
    assert not (run / "stage.yaml").exists()  # the refused config is not recorded as the run's

    # The stage the checkpoint was written with, but another mesh on the command line.
    cfg = write_stage(tmp_path / "same.yaml", stage_dict(corpus, run))
    ck = Checkpointer(run / "checkpoints", old.checkpoint)
    try:
        meta = {"step": 4, "stage": stage_fingerprint(old, resolve_stage(old, num_devices=8))}
        ck.save(4, {"x": jnp.zeros(2)}, _Iter(), {**meta, "skips": {}})
        ck.wait()
    finally:
        ck.close()
    r8 = str(REPO / "configs/mesh/cpu8_r8.yaml")
    assert main(["--config", str(cfg), "--mesh", r8, "--no-progress"]) == EXIT_CONFIG
    assert "config error: resolved.mesh.ring:" in capsys.readouterr().err
    assert not (run / "stage.yaml").exists()
