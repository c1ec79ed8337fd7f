"""Exact resume (reliability scenarios 1 and 2): real SIGKILLs at named kill sites and SIGTERM.

The trainer runs as a child process on 8 simulated CPU devices. A reference run goes through
uninterrupted; the interrupted runs are killed at a chain of kill sites (mid array write, before
the commit rename, mid iterator-state write, a random offset into the async save, after a step,
after a commit, between the last checkpoint and the final model), relaunched with the same
command each time, and must end with per-step float32 loss bits, batch fingerprints and
consumed sample ids identical to the reference, with no partial checkpoint ever visible.

A second chain SIGKILLs at >= 20 seeded random offsets inside save windows (each launch
resumes and is killed during the save it reaches first). It also covers checkpoint integrity
end to end: the newest committed step is damaged once, and the next launch must skip it
and resume from the step before.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _harness import (
    REPO,
    flip_array_byte,
    run_trainer,
    stage_dict,
    trainer_cmd,
    trainer_env,
    write_stage,
)

from longvila_jax.train.checkpoint import CORRUPT_DIR
from longvila_jax.train.integrity import verify_step_dir
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
def reference_run(corpus, jax_cache, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reference")
    r = run_trainer(_stage(corpus, d), jax_cache)
    assert r.returncode == 0, r.stderr[-4000:]
    return d / "run"


@pytest.fixture(scope="module")
def reference(reference_run):
    recs = read_metrics(reference_run)
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


def _assert_every_record_matches(run: Path, reference: dict) -> None:
    """Every step record ever logged, killed launches included, equals the reference's."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" in rec:
            continue
        ref = reference[rec["step"]]
        for key in ("loss_bits", "batch_sha256", "sample_ids"):
            assert rec[key] == ref[key], f"step {rec['step']}: {key} differs from the reference"


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


SEED = 5  # offsets are drawn from random.Random(SEED)
RANDOM_KILLS = 20
MAX_LAUNCHES = 32  # kills that land after the commit are retried with a shorter window


def _save_window_s(run: Path) -> float:
    """Longest temp-dir-to-commit time of ``run``'s checkpoints (Orbax's step metadata)."""
    spans = []
    for p in (run / "checkpoints").iterdir():
        if p.name.isdigit():
            m = json.loads((p / "_CHECKPOINT_METADATA").read_text())
            spans.append((m["commit_timestamp_nsecs"] - m["init_timestamp_nsecs"]) / 1e9)
    assert spans, f"no checkpoints in {run}"
    return max(spans)


class _OffsetChain:
    """Launches of one run directory, each killed at a random offset into its first save."""

    def __init__(self, corpus: Path, jax_cache: Path, tmp_path: Path, reference: dict):
        self.corpus = corpus
        self.jax_cache = jax_cache
        self.tmp_path = tmp_path
        self.reference = reference
        self.trials: list[tuple[str, int, int, str]] = []  # (kill spec, resumed, target, outcome)
        self.runs = 0
        self.new_run()

    def new_run(self) -> None:
        self.runs += 1
        d = self.tmp_path / f"chain{self.runs}"
        d.mkdir()
        self.cfg, self.run = _stage(self.corpus, d), d / "run"

    def launch(self, kill: str) -> tuple[list[int], list[dict]]:
        """Runs one launch killed by ``kill``; returns (committed steps, its new resume events)."""
        seen = len(_events(self.run, "resume")) if (self.run / "metrics.jsonl").is_file() else 0
        r = run_trainer(self.cfg, self.jax_cache, kill=kill)
        assert r.returncode == -signal.SIGKILL, (kill, r.returncode, r.stderr[-4000:])
        assert f"SIGKILL at {kill.split('@')[0]}" in r.stderr, r.stderr[-2000:]
        self.stderr = r.stderr
        committed = _committed(self.run)
        for s in committed:  # every visible step is complete and matches its manifest
            assert verify_step_dir(self.run / "checkpoints" / str(s), s) is None, s
        return committed, _events(self.run, "resume")[seen:]

    def finish(self) -> None:
        r = run_trainer(self.cfg, self.jax_cache)
        assert r.returncode == 0, r.stderr[-4000:]
        assert not [p for p in (self.run / "checkpoints").iterdir() if "tmp" in p.name]
        _assert_matches(self.run, self.reference)
        _assert_every_record_matches(self.run, self.reference)


def test_sigkill_at_random_save_offsets_resumes_bit_exactly(
    corpus, jax_cache, tmp_path, reference, reference_run
):
    rng = random.Random(SEED)
    window = reference_window = _save_window_s(reference_run)
    chain = _OffsetChain(corpus, jax_cache, tmp_path, reference)
    try:
        # Setup: steps 2 and 4 committed. Then one flipped bit in step 4's array data: the
        # next launch must warn, move step 4 aside and resume from step 2 (scenario 12).
        committed, _ = chain.launch("mid_write@6")
        assert committed == [2, 4]
        bad = flip_array_byte(chain.run / "checkpoints" / "4")
        resume_from, in_window, launches = 2, 0, 0
        while in_window < RANDOM_KILLS:
            assert launches < MAX_LAUNCHES, f"{in_window} of {launches} kills inside a save"
            if resume_from == STEPS:  # nothing left to save in this run: finish, start over
                chain.finish()
                chain.new_run()
                resume_from = 0
            target = resume_from + 2
            kill = f"offset={rng.uniform(0.0, window):.4f}@{target}"
            committed, resumes = chain.launch(kill)
            launches += 1
            if launches == 1:
                assert (
                    f"checkpoint step 4 in {chain.run / 'checkpoints'} is corrupt" in chain.stderr
                )
                assert bad in chain.stderr
                assert [e["step"] for e in _events(chain.run, "checkpoint_rejected")] == [4]
                assert (chain.run / "checkpoints" / CORRUPT_DIR / "4").is_dir()
            # The launch resumed from the newest good committed step (none: a fresh start).
            assert [e["step"] for e in resumes] == ([resume_from] if resume_from else [])
            assert max(committed, default=0) in (resume_from, target), committed
            if target in committed:  # the kill came after the commit: the chain moves on
                chain.trials.append((kill, resume_from, target, "after commit"))
                window *= 0.75
                resume_from = target
            else:  # 0 restores from partial dirs: the next launch resumes where this one did
                chain.trials.append((kill, resume_from, target, "inside the save"))
                in_window += 1
        chain.finish()
    except Exception as e:  # failures and timeouts: report the seed and every kill so far
        trials = "\n  ".join(map(str, chain.trials))
        raise AssertionError(
            f"{e}\nseed {SEED}, reference save window {reference_window:.4f}s, kills "
            f"(spec, resumed from, target, outcome):\n  {trials}"
        ) from e
