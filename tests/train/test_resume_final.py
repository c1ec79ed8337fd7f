"""Exact resume when the final phase is killed: inside ``final/`` and the VILA export.

The final phase (after the last checkpoint) writes the project checkpoint ``final/`` and, with
``export_vila``, the VILA layout ``vila/``, each under a temporary name renamed when complete.
Every run directory here starts as a copy of one snapshot: a run killed right after its last
checkpoint committed (``stage_transition@8``), so each launch restores step 8 and runs only
the final phase, without compiling a train step. Chains:

- ``dir_commit@2``: a launch that writes both directories is killed before ``vila/`` is
  renamed into place (``final/`` is committed, the export complete under its temporary name).
- >= 20 seeded random offsets, in turn of three kinds (``train.finish.arm_kill``):
  ``final_offset=<s>@8`` counts from the moment the phase begins (most of which restores the
  state and loads ``final/`` for the export); ``final_write=<s>@8`` and ``vila_write=<s>@8``
  count from the moment the launch creates the temporary dir of ``final/`` (``vila/``), so
  they land inside the short writes: mid Orbax save, mid safetensors file, between files, or
  right after the rename. The windows are timed on the first chain's launches. A launch that
  ends before its ``final_offset`` finishes its run directory (and shrinks that window); a
  run directory with both outputs is relaunched once more.

After each kill, a visible ``final/`` or ``vila/`` must be complete and equal to the reference's
(a killed write stays under a temporary name). Each run directory must end equal to the
uninterrupted reference bit for bit (``assert_chain_end``: metrics, ``final/`` params
and manifest, ``vila/`` bytes, no temporary leftovers). The named kill points of this phase are
in ``test_resume.py``'s chain.
"""

from __future__ import annotations

import random
import shutil
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
    final_state,
    fired_kill,
    leftovers,
    read_events,
    report_kills,
    resume_stage,
)

pytestmark = pytest.mark.slow

SEED = 11  # offsets are drawn from random.Random(SEED)
RANDOM_KILLS = 20
MAX_LAUNCHES = 30  # launches that end before their offset are retried with a shorter window
KINDS = ("final_write", "final_offset")  # offset kinds in turn while final/ is not written


class _FinalChain:
    """Run directories copied from one snapshot taken right before the final phase."""

    def __init__(self, corpus: Path, trainer: TrainerServer, tmp_path: Path, reference: Reference):
        self.corpus, self.trainer, self.tmp_path = corpus, trainer, tmp_path
        self.reference = reference
        self.trials: list[tuple[str, tuple, str]] = []  # (kill spec, state before, outcome)
        self.fired: list[str] = []
        self.runs = 0
        cfg = resume_stage(corpus, tmp_path / "snapshot")
        self.snapshot = tmp_path / "snapshot" / "run"
        # Setup (not counted here: test_resume.py's chain has this kill point).
        r = trainer.run(cfg, kill=f"stage_transition@{RESUME_STEPS}")
        assert r.returncode == -signal.SIGKILL, r.stderr[-4000:]
        assert committed_steps(self.snapshot) == [RESUME_STEPS - 2, RESUME_STEPS]
        assert final_state(self.snapshot) == (False, False, 0, 0)
        assert not leftovers(self.snapshot)

    def new_run(self) -> None:
        self.runs += 1
        d = self.tmp_path / f"chain{self.runs}"
        self.cfg, self.run = resume_stage(self.corpus, d), d / "run"
        shutil.copytree(self.snapshot, self.run)
        self.launched = False

    def launch(self, kill: str | None) -> bool:
        """One launch armed with ``kill``; True if it was killed, False if it ended first."""
        seen = len(read_events(self.run, "resume"))
        self.launched = True
        r = self.trainer.run(self.cfg, kill=kill)
        if r.returncode == 0 and kill is not None and kill.startswith("final_offset="):
            # The phase ended first. (A timer that fires while the interpreter is exiting may
            # still print its "SIGKILL at" line before the exit wins; the kill did not land.)
            return False
        assert r.returncode == (-signal.SIGKILL if kill else 0), (r.returncode, r.stderr[-4000:])
        if kill:
            assert fired_kill(r.stderr) == kill, r.stderr[-2000:]
            self.fired.append(kill)
        # Each launch restored the last checkpoint (none is written in this phase) ...
        resumes = [e["step"] for e in read_events(self.run, "resume")[seen:]]
        assert resumes in ([RESUME_STEPS], []), resumes  # [] when there was nothing to do
        assert committed_steps(self.run) == [RESUME_STEPS - 2, RESUME_STEPS]
        # ... and whatever it left visible is complete.
        assert_outputs_valid(self.run, self.reference)
        return True

    def finish(self) -> None:
        assert self.launch(None)
        assert_chain_end(self.run, self.reference)


def _at(run: Path, event: str) -> float:
    return read_events(run, event)[-1]["time"]


def _first_write(d: Path) -> float:
    return min(p.stat().st_mtime for p in d.rglob("*") if p.is_file())


def test_sigkill_in_final_phase_resumes_bit_exactly(
    corpus, jax_cache, tmp_path, reference, trainer
):
    rng = random.Random(SEED)
    windows = {}  # offset kind (by final/ visible) -> seconds its offsets are drawn from
    chain = _FinalChain(corpus, trainer, tmp_path, reference)
    kill = "(setup)"
    try:
        # Both outputs written by one launch, killed before vila/ is renamed into place.
        chain.new_run()
        kill = "dir_commit@2"
        assert chain.launch(kill)
        assert final_state(chain.run) == (True, False, 0, 3)
        run = chain.run
        prepare = _at(run, "final_written") - _at(run, "final_phase")
        windows["final_write"] = _at(run, "final_written") - _first_write(run / "final")
        chain.finish()  # exports only
        # The windows, timed on these warm launches (the reference run compiled): a launch
        # that finds final/ on disk only exports, one that does not also writes it.
        windows["final_offset", True] = _at(run, "final") - _at(run, "final_phase")
        export = _at(run, "final") - _at(run, "final_written")
        windows["final_offset", False] = prepare + export
        windows["vila_write"] = _at(run, "final") - _first_write(run / "vila")

        chain.new_run()
        killed = launches = 0
        scale = 1.0  # of the final_offset windows, shrunk when a launch ends first
        drawn = {False: 0, True: 0}  # offsets drawn with final/ visible or not
        tried = set()
        while killed < RANDOM_KILLS:
            assert launches < MAX_LAUNCHES, f"{killed} of {launches} launches killed"
            before = final_state(chain.run)
            # In turn: anywhere in the phase (mostly restoring and loading final/), or in the
            # short writes of final/ or vila/, counted from their temporary dir's creation.
            kinds = ("vila_write", "final_offset", "vila_write") if before[0] else KINDS
            kind = kinds[drawn[before[0]] % len(kinds)]
            drawn[before[0]] += 1
            if kind == "final_offset":
                window = windows[kind, before[0]] * scale
            else:
                window = windows[kind] * 1.25  # past the commit: killed right after it
            kill = None
            while kill is None or kill in tried:  # a point tried before would not count
                kill = f"{kind}={rng.uniform(0.0, window):.4f}@{RESUME_STEPS}"
            tried.add(kill)
            launches += 1
            if not chain.launch(kill):  # the phase ended first: this run is complete
                chain.trials.append((kill, before, "ended first"))
                assert_chain_end(chain.run, reference)
                scale *= 0.75
                chain.new_run()
                continue
            killed += 1
            chain.trials.append((kill, before, f"killed, left {final_state(chain.run)}"))
            if final_state(chain.run)[:2] == (True, True):  # killed after everything
                chain.finish()
                chain.new_run()
        if chain.launched:
            chain.finish()
    except Exception as e:  # failures and timeouts: report the seed and every kill so far
        trials = "\n  ".join(map(str, chain.trials))
        raise AssertionError(
            f"{e}\nlast kill armed: {kill}; seed {SEED}, windows {windows}; kills (spec, (final, "
            f"vila, final temps, vila temp files) before, outcome):\n  {trials}"
        ) from e
    assert len([t for t in chain.trials if t[2].startswith("killed")]) == RANDOM_KILLS
    print(f"windows {windows}; kills:", *chain.trials, sep="\n  ")
    report_kills(jax_cache, "final_phase", chain.fired)
