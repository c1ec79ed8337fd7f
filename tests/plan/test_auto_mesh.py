"""``--mesh auto``: the trainer asks the planner for a mesh on the 8 simulated CPU devices, the
YAML it writes loads as a mesh file, and one MM-SP step of the tiny model trains on it; the dry
run shows the planner's predicted memory and step time, and plans a 256-GPU mesh that fits where
the stage's own mesh does not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.stages import video_stage_dict, write_stage

from longvila_jax.parallel.mesh import load_mesh_config, validate_mesh
from longvila_jax.train.__main__ import main
from longvila_jax.train.loop import EXIT_OK

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from longvila_jax.data.synthetic import generate

    out = tmp_path_factory.mktemp("plan_corpus")
    generate(out, seed=0, size=64, n_images=4, n_videos=4)
    return out


def test_mesh_auto_picks_a_valid_mesh_and_trains_one_step(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    data = video_stage_dict(
        corpus,
        run_dir,
        {"sp_degree": 1, "batch_size": 2, "max_frames_per_row": 8},
        objective="mmsp",
        steps=1,
        trainable=[".*"],
        optim={"lr": 1.0e-3, "warmup_steps": 0},
        checkpoint={"every": 1, "keep": 2},
        # The stage's own mesh sizes are dropped by --mesh auto.
        mesh_set=["ring=8", "ulysses=1"],
    )
    cfg = write_stage(tmp_path / "stage.yaml", data)
    code = main(["--config", str(cfg), "--mesh", "auto", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    line = next(x for x in err.splitlines() if x.startswith("mesh auto:"))
    path = re.search(r"\((/[^)]+\.yaml)\)$", line).group(1)
    mesh = load_mesh_config(path)
    sizes = validate_mesh(mesh, 8, num_heads=4, num_kv_heads=2, seq_len=256, devices_per_process=8)
    assert sizes == {k: getattr(mesh, k) for k in ("data", "fsdp", "ring", "ulysses")}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and {r["step"] for r in steps} == {1}
    assert steps[-1]["loss"] > 0 and steps[-1]["applied"]


def _dry(capsys, *argv):
    code = main(
        ["--config", str(ROOT / "configs/stages/s5_long_sft_2048f.yaml"), "--dry-run", *argv]
    )
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_dry_run_shows_the_planner_and_auto_fits_256_gpus(capsys, compile_events):
    before = len(compile_events)
    code, report, err = _dry(capsys)
    assert code == 0 and "planner" in err
    own = report["planner"]
    assert own["step_s"] > 0 and own["memory_gib"] > 80 and not own["fits"]  # no param sharding
    code, auto, err = _dry(capsys, "--mesh", "auto", "--devices", "256")
    assert code == 0 and "mesh auto:" in err
    assert auto["planner"]["fits"] and auto["planner"]["memory_gib"] < 80
    m = auto["mesh"]
    assert m["data"] * m["fsdp"] * m["ring"] * m["ulysses"] == 256 and 28 % m["ulysses"] == 0
    assert len(compile_events) == before  # planning compiles nothing
