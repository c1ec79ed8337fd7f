"""Exact resume (reliability scenarios 1 and 2): real SIGKILLs at named kill sites and SIGTERM.

The trainer runs as a child process on 8 simulated CPU devices (the chain's launches are forked
from ``helpers.harness``, which has done the imports; the reference and the SIGTERM test
start fresh interpreters). A reference run goes through uninterrupted (once per session,
``shared_reference``); the interrupted run is killed at a chain of named kill sites,
relaunched with the same command each time:

- in the training loop's saves: mid array write, after a step, before the commit rename, mid
  iterator-state write, a fixed offset into the async save, after a commit;
- in the final phase: between the last checkpoint and the final model, after the final
  checkpoint's params group is saved, before ``final/`` is renamed into place, after ``final/``
  and before the VILA export, after each safetensors file of the export, and after ``vila/``.

After each kill, every visible checkpoint step, ``final/`` and ``vila/`` must be complete (a
killed write stays under a temporary name) and the on-disk state must be the one the site names.
The chain must end with per-step float32 loss bits, batch fingerprints and consumed sample ids
identical to the reference (nothing lost or repeated), ``final/`` params bit-identical and
verified against its manifest, ``vila/`` byte-identical, and no temporary leftovers. The SIGTERM
test checks the preemption path the same way. The other chains are in ``test_resume_offsets.py``
(random offsets into save windows, checkpoint damage) and ``test_resume_final.py`` (random
offsets into the final phase).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from helpers.harness import (
    REPO,
    RESUME_STEPS,
    assert_chain_end,
    assert_outputs_valid,
    committed_steps,
    final_state,
    fired_kill,
    read_events,
    report_kills,
    resume_stage,
    run_trainer,
    trainer_cmd,
    trainer_env,
)

from longvila_jax.train.loop import EXIT_PREEMPTED
from longvila_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


# Each launch is killed at one site; the next launch is the same command. For the final phase,
# the state each kill leaves (final_state) is given: the site is where it claims to be.
KILL_CHAIN = (
    ("mid_write@2", None),
    ("after_step@3", None),
    ("before_commit@4", None),
    ("mid_iter_state@6", None),
    ("offset=0.002@6", None),
    ("after_commit@8", None),
    ("stage_transition@8", (False, False, 0, 0)),
    ("ckpt_group@1", (False, False, 1, 0)),  # final/'s params saved, not committed
    ("dir_commit@1", (False, False, 1, 0)),  # final/ complete under its temporary name
    ("final_written@8", (True, False, 0, 0)),
    ("export_file@1", (True, False, 0, 1)),  # vila/llm done
    ("export_file@2", (True, False, 0, 2)),  # vila/vision_tower done
    ("export_file@3", (True, False, 0, 3)),  # vila/mm_projector done, not committed
    ("stage_done@8", (True, True, 0, 0)),
)


def test_sigkill_chain_resumes_bit_exactly(corpus, jax_cache, tmp_path, reference, trainer):
    cfg = resume_stage(corpus, tmp_path)
    run = tmp_path / "run"
    fired, kill = [], "(none: the last launch)"
    try:
        for kill, state in KILL_CHAIN:
            before = committed_steps(run)
            r = trainer.run(cfg, kill=kill)
            assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-4000:])
            assert fired_kill(r.stderr) == kill, r.stderr[-2000:]
            fired.append(kill)
            resumes = read_events(run, "resume")
            if before:
                # The launch resumed from the newest step committed before it started.
                assert resumes and resumes[-1]["step"] == before[-1], (before, resumes)
            assert len(committed_steps(run)) <= 2  # keep: 2
            assert_outputs_valid(run, reference)
            if state is not None:
                assert final_state(run) == state
        kill = "(none: the last launch)"
        r = trainer.run(cfg)  # after stage_done: nothing left to do
        assert r.returncode == 0, r.stderr[-4000:]
        assert_chain_end(run, reference)
    except Exception as e:  # report every kill so far
        raise AssertionError(f"{e}\nfailed at kill {kill}; kills that fired: {fired}") from e
    report_kills(jax_cache, "named", fired)


def test_sigterm_saves_and_resumes_bit_exactly(corpus, jax_cache, tmp_path, reference):
    cfg = resume_stage(corpus, tmp_path)
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
    assert logged < RESUME_STEPS
    # The step in progress was committed before exiting: no step is lost.
    assert committed_steps(run)[-1] == logged
    assert read_events(run, "preempted")[-1]["step"] == logged
    r = run_trainer(cfg, jax_cache)
    assert r.returncode == 0, r.stderr[-4000:]
    assert read_events(run, "resume")[-1]["step"] == logged
    assert_chain_end(run, reference)
