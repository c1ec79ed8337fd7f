"""Exact resume (reliability scenarios 1 and 2): real SIGKILLs at named kill sites and SIGTERM.

The trainer runs as a child process on 8 simulated CPU devices. A reference run goes through
uninterrupted; the interrupted runs are killed at a chain of kill sites (mid array write, before
the commit rename, mid iterator-state write, a random offset into the async save, after a step,
after a commit, between the last checkpoint and the final model), relaunched with the same
command each time, and must end with per-step float32 loss bits, batch fingerprints and
consumed sample ids identical to the reference, with no partial checkpoint ever visible.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _harness import REPO, run_trainer, stage_dict, trainer_cmd, trainer_env, write_stage

from longvila_jax.train.loop import EXIT_PREEMPTED
from longvila_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 8


def _stage(corpus: Path, d: Path) -> Path:
    data = stage_dict(
        corpus,
        d / "run",
        steps=STEPS,
        optim={"lr": 1.0e-3, "warmup_steps": 1, "grad_accum": 2},
    )
    return write_stage(d / "stage.yaml", data)


@pytest.fixture(scope="module")
def reference(corpus, jax_cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    r = run_trainer(_stage(corpus, d), jax_cache)
    assert r.returncode == 0, r.stderr[-4000:]
    recs = read_metrics(d / "run")
    assert sorted(recs) == list(range(1, STEPS + 1))
    return recs


def _committed(run: Path) -> list[int]:
    ck = run / "checkpoints"
    steps = []
    for p in ck.iterdir() if ck.is_dir() else []:
        if p.name.isdigit():
            # A step dir visible under its final name must be complete.
            assert (p / "commit_success.txt").is_file(), f"partial checkpoint visible: {p}"
            assert (p / "state").is_dir() and (p / "data_iter").is_dir(), p
            steps.append(int(p.name))
    return sorted(steps)


def _events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def _assert_matches(run: Path, reference: dict) -> None:
    got = read_metrics(run)
    assert sorted(got) == sorted(reference)
    for step, ref in reference.items():
        assert got[step]["loss_bits"] == ref["loss_bits"], f"step {step} loss differs"
        assert got[step]["batch_sha256"] == ref["batch_sha256"], f"step {step} batch differs"
        assert got[step]["sample_ids"] == ref["sample_ids"], f"step {step} samples differ"
    ids = collections.Counter(i for r in got.values() for i in r["sample_ids"])
    ref_ids = collections.Counter(i for r in reference.values() for i in r["sample_ids"])
    assert ids == ref_ids  # nothing lost, nothing repeated
    assert (run / "final" / "model.yaml").is_file()


# Each launch is killed at one site; the next launch is the same command.
KILL_CHAIN = (
    "mid_write@2",
    "after_step@3",
    "before_commit@4",
    "mid_iter_state@6",
    "offset=0.002@6",
    "after_commit@8",
    "stage_transition@8",
)


def test_sigkill_chain_resumes_bit_exactly(corpus, jax_cache, tmp_path, reference):
    cfg = _stage(corpus, tmp_path)
    run = tmp_path / "run"
    for kill in KILL_CHAIN:
        before = _committed(run) if run.exists() else []
        r = run_trainer(cfg, jax_cache, kill=kill)
        assert r.returncode == -signal.SIGKILL, (kill, r.returncode, r.stderr[-4000:])
        assert f"SIGKILL at {kill.split('@')[0]}" in r.stderr, r.stderr[-2000:]
        resumes = _events(run, "resume")
        if before:
            # The launch resumed from the newest step committed before it started.
            assert resumes and resumes[-1]["step"] == before[-1], (kill, before, resumes)
        after = _committed(run)
        assert len(after) <= 2  # keep: 2
    r = run_trainer(cfg, jax_cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    _assert_matches(run, reference)


def test_sigterm_saves_and_resumes_bit_exactly(corpus, jax_cache, tmp_path, reference):
    cfg = _stage(corpus, tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        trainer_cmd(cfg),
        env=trainer_env(jax_cache),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and read_metrics(run):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "trainer ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, (proc.returncode, err[-4000:])
    logged = max(read_metrics(run))
    assert logged < STEPS
    # The step in progress was committed before exiting: no step is lost.
    assert _committed(run)[-1] == logged
    assert _events(run, "preempted")[-1]["step"] == logged
    r = run_trainer(cfg, jax_cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _events(run, "resume")[-1]["step"] == logged
    _assert_matches(run, reference)
