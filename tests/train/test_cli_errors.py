"""The trainer CLI names bad input on one line instead of printing a traceback.

Config problems exit 2 with ``config error: ...`` naming the file or field: a YAML syntax error,
an unsafe tag, a missing file, a FIFO, a duplicate key or an alias bomb in any of the stage,
model, data and mesh YAML files. Other input errors at start-up (a tampered init checkpoint, no
intact checkpoint to resume, a bad sample under ``--fail-fast``) exit 1 with ``error: ...``.
These all fail before anything is compiled except the ``--fail-fast`` case (initial state
only), so the cases run in-process through ``main``; a mesh that does not fit the devices is
checked in a real one-device subprocess, where the message must say how to simulate devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.harness import REPO, TINY_MODEL, stage_dict, write_stage
from helpers.xla_env import FAST_COMPILE

from longvila_jax.config.base import from_dict
from longvila_jax.config.train import StageConfig
from longvila_jax.train import loop
from longvila_jax.train.__main__ import main
from longvila_jax.train.fingerprint import stage_fingerprint
from longvila_jax.train.resolve import resolve_stage

FILES = ("stage", "model", "data", "mesh")
ATTACKS = ("syntax", "unsafe_tag", "missing", "fifo", "duplicate_key", "alias_bomb")


def _alias_bomb() -> str:
    """About 1 KB of YAML that expands to 10**6 nodes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 6):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _attack(path: Path, attack: str) -> Path:
    """Writes the hostile YAML ``attack`` at ``path`` (nothing for ``missing``)."""
    if attack == "fifo":
        os.mkfifo(path)
    elif attack != "missing":
        text = {
            "syntax": "name: [\n  - a\n",
            "unsafe_tag": f"!!python/object/apply:os.system ['touch {path}.pwned']\n",
            "duplicate_key": "name: a\nname: b\n",
            "alias_bomb": _alias_bomb(),
        }[attack]
        path.write_text(text)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("which", FILES)
def test_hostile_yaml_is_a_config_error(corpus, tmp_path, capsys, which, attack):
    bad = _attack(tmp_path / f"{which}.yaml", attack)
    d = stage_dict(corpus, tmp_path / "run")
    field = {"stage": "", "model": "model: ", "data": "data.file: ", "mesh": "mesh: "}[which]
    if which == "model":
        d["model"] = str(bad)
    elif which == "data":
        d["data"] = {"file": str(bad)}
    elif which == "mesh":
        d["mesh"] = str(bad)
    cfg = bad if which == "stage" else write_stage(tmp_path / "ok_stage.yaml", d)
    code, err = _run(["--config", str(cfg)], capsys)
    assert code == loop.EXIT_CONFIG, err
    assert err.startswith(f"config error: {field}") and err.count("\n") == 1, err
    assert str(bad) in err
    assert not Path(f"{bad}.pwned").exists()
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def _text_stage(corpus: Path, tmp_path: Path, lines: list[str], **overrides) -> Path:
    """A stage reading one text manifest (absolute path) of ``lines``."""
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines))
    d = stage_dict(corpus, tmp_path / "run", **overrides)
    d["data"]["inline"]["datasets"] = [{"name": "texts", "manifest": str(manifest), "kind": "text"}]
    return write_stage(tmp_path / "stage.yaml", d)


GOOD_TEXT = [json.dumps({"id": f"t{i}", "text": [5 + i, 6, 7, 8, 9]}) for i in range(4)]


def test_tampered_init_checkpoint_is_an_error(corpus, tmp_path, capsys):
    fake = tmp_path / "init_ckpt"
    (fake / "params").mkdir(parents=True)
    (fake / "model.yaml").write_text(Path(TINY_MODEL).read_text())
    cfg = _text_stage(corpus, tmp_path, GOOD_TEXT, init_from=str(fake))
    code, err = _run(["--config", str(cfg)], capsys)
    assert code == loop.EXIT_FAILED
    assert err.startswith(f"error: {fake}: integrity check failed") and err.count("\n") == 1


def test_corrupt_checkpoints_are_an_error(corpus, tmp_path, capsys):
    (tmp_path / "run/checkpoints/2/state").mkdir(parents=True)  # committed, no manifest
    cfg = _text_stage(corpus, tmp_path, GOOD_TEXT)
    code, err = _run(["--config", str(cfg)], capsys)
    assert code == loop.EXIT_FAILED
    assert err.startswith("error: ") and "no committed checkpoint matches" in err
    assert "step 2: integrity.sha256.json: missing" in err


def test_fail_fast_stops_at_the_first_bad_sample(corpus, tmp_path, capsys):
    hostile = '{"id": "big", "text": [5, 18446744073709551616]}'  # 2**64
    cfg = _text_stage(corpus, tmp_path, [GOOD_TEXT[0], hostile, *GOOD_TEXT[1:]])
    code, err = _run(["--config", str(cfg), "--fail-fast"], capsys)
    assert code == loop.EXIT_FAILED
    assert err.startswith("error: sample texts:big: bad_record (token id 18446744073709551616")
    assert not (tmp_path / "run/checkpoints/1").exists()


def test_fail_fast_is_not_in_the_resume_fingerprint(corpus, tmp_path):
    stage = from_dict(StageConfig, stage_dict(corpus, tmp_path / "run"))
    resolved = resolve_stage(stage, num_devices=8)
    ff = dataclasses.replace(resolved, data=dataclasses.replace(resolved.data, fail_fast=True))
    assert stage_fingerprint(stage, resolved) == stage_fingerprint(stage, ff)


def test_mesh_for_more_devices_says_how_to_simulate_them(corpus, tmp_path):
    """A real one-device launch (no simulated devices) of a stage on the 8-device CPU mesh."""
    cfg = write_stage(tmp_path / "stage.yaml", stage_dict(corpus, tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "longvila_jax.train", "--config", str(cfg), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == loop.EXIT_CONFIG, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("config error: mesh.data*fsdp*ring*ulysses: axis product 8")
    assert "!= device count 1" in line
    assert "JAX_NUM_CPU_DEVICES=8" in line and "xla_force_host_platform_device_count=8" in line
