"""The planner's enumeration: every factorisation of the device count is listed, each invalid
one with its reason, validity agrees with ``parallel.mesh.validate_mesh``, and the CLI ranks,
prints JSON and writes a mesh YAML that ``load_mesh_config`` reads. Analytic only: nothing is
compiled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.parallel.mesh import load_mesh_config
from longvila_jax.plan.__main__ import main
from longvila_jax.plan.hardware import make_cluster, measured_efficiency
from longvila_jax.plan.search import (
    REMATS,
    check_with_mesh,
    enumerate_plans,
    factorisations,
)
from longvila_jax.plan.workload import Workload

ROOT = Path(__file__).resolve().parents[2]


def _model(name: str) -> ModelConfig:
    return load_config(ModelConfig, ROOT / "configs/model" / name)


@pytest.mark.parametrize("n, count", [(8, 20), (16, 35), (12, 40)])
def test_factorisations_are_every_ordered_4_tuple(n, count):
    found = list(factorisations(n))
    assert len(found) == len(set(found)) == count  # C(k+3, 3) per prime power, multiplied
    brute = {
        (a, b, c, d)
        for a in range(1, n + 1)
        for b in range(1, n + 1)
        for c in range(1, n + 1)
        for d in range(1, n + 1)
        if a * b * c * d == n
    }
    assert set(found) == brute


@pytest.mark.parametrize(
    "model, nodes, per_node, seq_len",
    [("tiny-qwen2.yaml", 1, 8, 256), ("llama3-longvila-8b.yaml", 2, 8, 65536)],
)
def test_every_factorisation_is_listed_and_invalid_ones_say_why(model, nodes, per_node, seq_len):
    work = Workload.custom(_model(model), seq_len=seq_len, frames=0, global_rows=16)
    cluster = make_cluster("h100-sxm", nodes=nodes, devices_per_node=per_node, hbm_gib=1e6)
    plans = enumerate_plans(work, cluster)
    meshes = {
        (p.candidate.data, p.candidate.fsdp, p.candidate.ring, p.candidate.ulysses) for p in plans
    }
    assert meshes == set(factorisations(nodes * per_node))
    assert {p.candidate.remat for p in plans} == set(REMATS)
    for p in plans:
        verdict = check_with_mesh(work, cluster, p.candidate)
        # Memory is unconstrained here: valid exactly when the project's own check accepts.
        assert p.valid == (verdict is None), (p.candidate, p.reasons, verdict)
        if not p.valid:
            assert p.reasons and all(isinstance(r, str) and r for r in p.reasons)
        else:
            assert p.tokens_per_s > 0 and p.time["step"] > 0
    valid = [p for p in plans if p.valid]
    assert valid and plans[: len(valid)] == valid  # valid first
    speeds = [p.tokens_per_s for p in valid]
    assert speeds == sorted(speeds, reverse=True)


def test_reasons_name_heads_nodes_length_batch_and_memory():
    qwen = _model("qwen2-7b-longvila-384.yaml")  # 28 query heads, 4 KV heads
    work = Workload.custom(qwen, seq_len=40, frames=0, global_rows=3)
    cluster = make_cluster("h100-sxm", nodes=2, devices_per_node=4, hbm_gib=1.0)
    plans = {
        (
            p.candidate.data,
            p.candidate.fsdp,
            p.candidate.ring,
            p.candidate.ulysses,
            p.candidate.remat,
            p.candidate.zero_sp,
        ): p
        for p in enumerate_plans(work, cluster)
    }
    text = lambda key: " | ".join(plans[key].reasons)  # noqa: E731
    assert "does not divide the 28 query heads" in text((1, 1, 1, 8, "none", False))
    assert "spans nodes of 4 devices" in text((1, 1, 1, 8, "none", False))
    assert "not a multiple of 2*ring*ulysses*block = 16" in text((1, 1, 2, 4, "none", False))
    assert "do not split into 2 groups" in text((2, 1, 1, 4, "none", False))
    assert "GiB budget" in text((1, 1, 4, 2, "none", False))  # 7B on 1 GiB
    # U = 2 does not divide... 4 KV heads: it does; U = 4 divides both; replication only when
    # U does not divide H_kv (mirrors parallel.ulysses.kv_replication).
    tiny = Workload.custom(_model("tiny-qwen2.yaml"), seq_len=256, frames=0)
    p = [
        q
        for q in enumerate_plans(tiny, make_cluster(nodes=1, devices_per_node=4))
        if q.candidate.ulysses == 4
    ][0]
    assert any("replicated x2" in n for n in p.notes)  # 2 KV heads, U = 4


def test_cli_table_json_and_mesh_yaml(tmp_path, capsys):
    out = tmp_path / "mesh" / "auto8.yaml"
    args = [
        "--model",
        str(ROOT / "configs/model/tiny-qwen2.yaml"),
        "--seq-len",
        "256",
        "--frames",
        "8",
        "--nodes",
        "1",
        "--devices-per-node",
        "8",
    ]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tok/s" in table and "invalid" in table
    cfg = load_mesh_config(out)
    assert cfg.data * cfg.fsdp * cfg.ring * cfg.ulysses == 8
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    best = report["best"]
    assert (best["data"], best["fsdp"], best["ring"], best["ulysses"]) == (
        cfg.data,
        cfg.fsdp,
        cfg.ring,
        cfg.ulysses,
    )
    assert all(c["reasons"] for c in report["candidates"] if not c["valid"])
    assert (
        main(
            [
                "--model",
                str(ROOT / "configs/model/tiny-qwen2.yaml"),
                "--seq-len",
                "256",
                "--nodes",
                "1",
                "--hbm-gib",
                "1e-6",
            ]
        )
        == 1
    )  # nothing fits
    assert (
        main(
            [
                "--model",
                str(ROOT / "configs/model/tiny-qwen2.yaml"),
                "--seq-len",
                "256",
                "--preset",
                "tpu",
            ]
        )
        == 2
    )


def test_gpu_measurement_sets_the_efficiencies(tmp_path):
    from longvila_jax.plan.hardware import ATTENTION_EFFICIENCY, MATMUL_EFFICIENCY

    assert measured_efficiency(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert measured_efficiency(tmp_path / "bad.json") == {}
    path = tmp_path / "gpu_suite.json"
    path.write_text(json.dumps({"mfu": 0.41, "attention_tflops": 247.25, "other": "x"}))
    assert measured_efficiency(path, peak_tflops=989.0) == {
        "matmul_eff": 0.41,
        "attention_eff": pytest.approx(0.25),
    }
    cluster = make_cluster("h100-sxm", measured=path, matmul_eff=0.5)  # flags win
    assert (cluster.matmul_eff, cluster.attention_eff) == (0.5, pytest.approx(0.25))
    default = make_cluster("h100-sxm", measured=tmp_path / "absent.json")
    assert (default.matmul_eff, default.attention_eff) == (MATMUL_EFFICIENCY, ATTENTION_EFFICIENCY)
