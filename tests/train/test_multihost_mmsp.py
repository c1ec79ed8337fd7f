"""Multi-process MM-SP training: 2 processes x 4 CPU devices (jax.distributed over gloo) with
``objective: mmsp`` on ring 2 x ulysses 4 train with the same losses as 1 process x 8 devices.

The ring axis crosses the processes, so the only sequence-parallel group spans both: they form
one data shard (``parallel.host_shards``), read the same rows (the iterator states they
checkpoint are identical) and each supplies its devices' (row, sequence) blocks. The global
batch is therefore the one-process batch, row for row (same sample ids). Losses are compared
at 1e-6 relative rather than bit for bit: the program is the same, but the psums of the CE sums
and of the gradients cross processes through gloo instead of XLA's in-process all-reduce, which
may add the same fp32 terms in another order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.harness import (
    distributed_env,
    free_port,
    run_concurrently,
    trainer_env,
    video_stage_dict,
    write_stage,
)

from longvila_jax.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
STEPS = 3


def _stage(corpus, d):
    # Only the LLM trains: the frames still go through the tower and both routing hops across
    # the processes (the loss sees them), and the step compiles ~15% faster.
    data = video_stage_dict(
        corpus,
        d / "run",
        {"sp_degree": 8, "max_frames_per_row": 12, "batch_size": 2},
        steps=STEPS,
        objective="mmsp",
        trainable=["llm/.*"],
        checkpoint={"every": STEPS, "keep": 2},
    )
    return write_stage(d / "stage.yaml", data)


def test_two_process_mmsp_matches_one_process(corpus, jax_cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    port, cfg = free_port(), _stage(corpus, two)
    runs = [(_stage(corpus, one), trainer_env(jax_cache))]
    runs += [(cfg, distributed_env(jax_cache, port, i, devices=4)) for i in range(2)]
    run_concurrently(runs)

    ref, got = read_metrics(one / "run"), read_metrics(two / "run")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step]["sample_ids"] == ref[step]["sample_ids"]
        assert got[step]["batch_sha256"] == ref[step]["batch_sha256"]
        assert ref[step]["tokens"] == got[step]["tokens"] > 0
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(got[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-5)
    # Both processes of the SP group read the same rows: identical iterator states.
    it = two / "run" / "checkpoints" / str(STEPS) / "data_iter"
    states = [json.loads((it / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1]
    assert (two / "run" / "final" / "model.yaml").is_file()
