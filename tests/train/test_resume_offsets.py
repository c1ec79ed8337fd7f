"""Exact resume at random points of the async saves (reliability scenarios 1, 2 and 12).

A chain SIGKILLs the trainer at >= 20 seeded random offsets inside save windows: each launch
resumes and is killed during the save it reaches first, the offset drawn up to the reference
run's longest save (a kill that lands after the commit shrinks the window and counts, but not
towards the 20). Every visible step must stay complete and match its integrity manifest. The
chain also covers checkpoint integrity end to end: the newest committed step is damaged once
(one flipped bit), and the next launch must warn, move it aside and resume from the step before.
When a run directory has nothing left to save, it is finished and must equal the reference
bit for bit (``helpers.harness.assert_chain_end``: metrics, ``final/`` params, ``vila/`` bytes, no
leftovers), and the chain goes on in a new one.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
from helpers.harness import (
    RESUME_STEPS,
    Reference,
    TrainerServer,
    assert_chain_end,
    assert_outputs_valid,
    committed_steps,
    fired_kill,
    flip_array_byte,
    read_events,
    report_kills,
    resume_stage,
)

from longvila_jax.train.checkpoint import CORRUPT_DIR
from longvila_jax.train.integrity import verify_step_dir

pytestmark = pytest.mark.slow

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

    def __init__(self, corpus: Path, trainer: TrainerServer, tmp_path: Path, reference: Reference):
        self.corpus = corpus
        self.trainer = trainer
        self.tmp_path = tmp_path
        self.reference = reference
        self.trials: list[tuple[str, int, int, str]] = []  # (kill spec, resumed, target, outcome)
        self.fired: list[str] = []
        self.runs = 0
        self.new_run()

    def new_run(self) -> None:
        self.runs += 1
        d = self.tmp_path / f"chain{self.runs}"
        d.mkdir()
        self.cfg, self.run = resume_stage(self.corpus, d), d / "run"

    def launch(self, kill: str) -> tuple[list[int], list[dict]]:
        """Runs one launch killed by ``kill``; returns (committed steps, its new resume events)."""
        seen = len(read_events(self.run, "resume")) if (self.run / "metrics.jsonl").is_file() else 0
        r = self.trainer.run(self.cfg, kill=kill)
        assert r.returncode == -signal.SIGKILL, (kill, r.returncode, r.stderr[-4000:])
        assert fired_kill(r.stderr) == kill, r.stderr[-2000:]
        self.fired.append(kill)
        self.stderr = r.stderr
        committed = committed_steps(self.run)
        for s in committed:  # every visible step is complete and matches its manifest
            assert verify_step_dir(self.run / "checkpoints" / str(s), s) is None, s
        assert_outputs_valid(self.run, self.reference)
        return committed, read_events(self.run, "resume")[seen:]

    def finish(self) -> None:
        r = self.trainer.run(self.cfg)
        assert r.returncode == 0, r.stderr[-4000:]
        assert_chain_end(self.run, self.reference)


def test_sigkill_at_random_save_offsets_resumes_bit_exactly(
    corpus, jax_cache, tmp_path, reference, trainer
):
    rng = random.Random(SEED)
    window = reference_window = _save_window_s(reference.run)
    chain = _OffsetChain(corpus, trainer, tmp_path, reference)
    kill = "(setup)"
    try:
        # Setup: steps 2 and 4 committed. Then one flipped bit in step 4's array data: the
        # next launch must warn, move step 4 aside and resume from step 2 (scenario 12).
        kill = "mid_write@6"
        committed, _ = chain.launch(kill)
        assert committed == [2, 4]
        bad = flip_array_byte(chain.run / "checkpoints" / "4")
        resume_from, in_window, launches = 2, 0, 0
        while in_window < RANDOM_KILLS:
            assert launches < MAX_LAUNCHES, f"{in_window} of {launches} kills inside a save"
            if resume_from == RESUME_STEPS:  # nothing left to save in this run: finish, start over
                chain.finish()
                chain.new_run()
                resume_from = 0
            target = resume_from + 2
            kill = None
            while kill is None or kill in chain.fired:  # a point tried before would not count
                kill = f"offset={rng.uniform(0.0, window):.4f}@{target}"
            committed, resumes = chain.launch(kill)
            launches += 1
            if launches == 1:
                assert (
                    f"checkpoint step 4 in {chain.run / 'checkpoints'} is corrupt" in chain.stderr
                )
                assert bad in chain.stderr
                assert [e["step"] for e in read_events(chain.run, "checkpoint_rejected")] == [4]
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
            f"{e}\nlast kill armed: {kill}; seed {SEED}, reference save window "
            f"{reference_window:.4f}s, kills (spec, resumed from, target, outcome):\n  {trials}"
        ) from e
    print(f"reference save window {reference_window:.4f}s; kills:", *chain.trials, sep="\n  ")
    report_kills(jax_cache, "save_offsets", chain.fired)
