"""2 processes x 4 CPU devices via jax.distributed (gloo, coordinator on 127.0.0.1): ring across
processes, Ulysses within; must equal the single-process 8-device run and the dense reference."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.mmsp_cases import max_abs, max_rel, packed_inputs
from helpers.mp_worker import HKV, B, D, H, T, run
from helpers.xla_env import jax_env

from longvila_jax.core.attention import dense_attention
from longvila_jax.parallel.mesh import MeshConfig, make_mesh

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    env = jax_env(4)  # not the 8 devices of conftest.py
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    port, out = _free_port(), tmp_path / "mp.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "helpers.mp_worker", str(i), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    multi = dict(np.load(out))

    single = run(make_mesh(MeshConfig(ring=2, ulysses=4), jax.devices()[:8]))
    for name in ("out", "dq", "dk", "dv"):
        assert max_abs(multi[name], single[name]) <= 1e-6, name

    x = packed_inputs(B, T, H, HKV, D, seed=1)
    ct = np.random.default_rng(7).standard_normal((B, T, H, D), dtype=np.float32)

    def loss(q, k, v):
        out = dense_attention(
            q, k, v, segment_ids=x["segment_ids"], positions=x["positions"],
            causal=True, scale=D**-0.5,
        )  # fmt: skip
        return jnp.sum(out * ct), out

    grads, ref = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x["q"], x["k"], x["v"])
    assert max_abs(multi["out"], ref) <= 1e-5
    for name, g in zip(("dq", "dk", "dv"), grads, strict=True):
        assert max_rel(multi[name], g) <= 1e-4, name
