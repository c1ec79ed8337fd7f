"""Multi-host training: 2 processes x 4 CPU devices (jax.distributed over gloo, set up by
``train.multihost`` from explicit variables) train with the same losses as 1 process x 8.

Each host reads its own shard of the sample stream (``ds[process_index::process_count]``). With
one sample per row, the global batch of every step holds the same samples in both set-ups (in
another row order), so per-step losses agree to fp32 summation-order rounding.
"""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from _harness import REPO, stage_dict, trainer_cmd, trainer_env, write_stage

from longvila_jax.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(corpus, d, rows_per_host):
    data = stage_dict(corpus, d / "run", steps=3, mesh_set=["data=2", "ring=1"])
    data["data"]["inline"].update(batch_size=rows_per_host, max_segments_per_row=1)
    data["checkpoint"] = {"every": 3, "keep": 2}
    return write_stage(d / "stage.yaml", data)


def test_two_hosts_match_one_host(corpus, jax_cache, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    r = subprocess.run(
        trainer_cmd(_stage(corpus, one, 4)),
        env=trainer_env(jax_cache),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]

    two = tmp_path / "two"
    two.mkdir()
    cfg = _stage(corpus, two, 2)
    port = _free_port()
    procs = []
    for i in range(2):
        env = trainer_env(jax_cache)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        env.update(
            LONGVILA_COORDINATOR=f"127.0.0.1:{port}",
            LONGVILA_NUM_PROCESSES="2",
            LONGVILA_PROCESS_ID=str(i),
        )
        procs.append(
            subprocess.Popen(
                trainer_cmd(cfg),
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]

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
