"""Multi-host training: 2 processes x 4 CPU devices (jax.distributed over gloo, set up by
``train.multihost`` from explicit variables) train with the same losses as 1 process x 8.

Each host reads its own shard of the sample stream (``ds[process_index::process_count]``). With
one sample per row, the global batch of every step holds the same samples in both set-ups (in
another row order), so per-step losses agree to fp32 summation-order rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.harness import (
    distributed_env,
    free_port,
    run_concurrently,
    stage_dict,
    trainer_env,
    write_stage,
)

from longvila_jax.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _stage(corpus, d, rows_per_host):
    data = stage_dict(corpus, d / "run", steps=3, mesh_set=["data=2", "ring=1"])
    data["data"]["inline"].update(batch_size=rows_per_host, max_segments_per_row=1)
    data["checkpoint"] = {"every": 3, "keep": 2}
    return write_stage(d / "stage.yaml", data)


def test_two_hosts_match_one_host(corpus, jax_cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    port, cfg = free_port(), _stage(corpus, two, 2)
    runs = [(_stage(corpus, one, 4), trainer_env(jax_cache))]
    runs += [(cfg, distributed_env(jax_cache, port, i, devices=4)) for i in range(2)]
    run_concurrently(runs)

    ref, got = read_metrics(one / "run"), read_metrics(two / "run")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for step in ref:
        # Host 0 logs its own rows: they are part of the one-host batch of the same step.
        assert set(got[step]["sample_ids"]) < set(ref[step]["sample_ids"])
        assert ref[step]["tokens"] == got[step]["tokens"]
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=2e-6)
        np.testing.assert_allclose(got[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-5)
    assert (two / "run" / "final" / "model.yaml").is_file()
    assert (two / "run" / "checkpoints" / "3" / "data_iter" / "process_1-of-2.json").is_file()
