"""bench/gpu_suite.py: its CPU smoke run end to end, the per-section guard and budget, and the
memory search of section d.

The smoke run is the GPU suite's own code at tiny shapes on one CPU device (Pallas in interpret
mode, ``jax.nn.dot_product_attention``'s XLA implementation standing in for cuDNN); every
section must produce finite numbers there. The guard and the search are checked in-process
with stand-ins, so no model compiles for them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.xla_env import jax_env

from longvila_jax.plan.hardware import measured_efficiency

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPT = BENCH / "gpu_suite.py"
SECTIONS = ("a_kernels", "b_ring", "c_train", "d_fit", "e_infer")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("suite") / "r" / "gpu_suite.json"
    run = subprocess.run(
        # A budget no loaded test machine reaches: the smoke run checks numbers, not speed.
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--budget", "3600", "--out", str(out)],
        env=jax_env(1),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text()), run.stdout


def _finite_positive(row: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) and row[k] > 0, (
            k,
            row,
        )


def test_smoke_run_measures_every_section(smoke, tmp_path):
    record, stdout = smoke
    assert record["cpu_smoke"] and record["device_kind"] and record["platform"] == "cpu"
    assert set(record["sections"]) == set(SECTIONS)
    for name in SECTIONS:  # every section must work on CPU: no error, no skip
        assert record["sections"][name]["status"] == "ok", record["sections"][name]
    _finite_positive(record["matmul_peak"], "tflops")
    assert f"### gpu_suite on {record['device_kind']}" in stdout and "| impl |" in stdout
    # The planner reads the measured rates from the suite's own JSON.
    (step,) = record["sections"]["c_train"]["rows"]
    assert record["planner"]["matmul_tflops"] == step["model_tflops"]
    assert record["planner"]["attention_tflops"] > 0
    path = tmp_path / "gpu_suite.json"
    path.write_text(json.dumps(record))
    eff = measured_efficiency(path, peak_tflops=1000.0)
    assert eff["matmul_eff"] == pytest.approx(min(1.0, step["model_tflops"] / 1000.0))
    assert eff["attention_eff"] == pytest.approx(record["planner"]["attention_tflops"] / 1000.0)


def test_smoke_kernels_and_ring(smoke):
    from longvila_jax.parallel.ring_kernels import block_forward

    record, _ = smoke
    has_pallas = "block_kernel" in inspect.signature(block_forward).parameters
    rows = record["sections"]["a_kernels"]["rows"]
    assert {r["impl"] for r in rows} == {"dot_product_attention[xla]", "ours xla", "ours pallas"}
    for r in rows:
        if r["impl"] == "ours pallas" and not has_pallas:
            assert r["status"].startswith("not available")
            continue
        assert r["status"] == "ok", r
        _finite_positive(r, "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops")
        if r["impl"].startswith("ours"):  # bf16 inputs, fp32 accumulation in both
            assert r["out_err_vs_peer"] < 2e-2 and r["grad_err_vs_peer"] < 5e-2, r
    ring = record["sections"]["b_ring"]["rows"]
    assert len(ring) == 3
    for r in ring:
        if "pallas" in r["impl"] and not has_pallas:
            continue
        assert r["status"] == "ok", r
        _finite_positive(r, "fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops")
    for r in ring[1:]:
        if r["status"] == "ok":
            assert r["out_err_vs_full"] < 2e-2 and r["grad_err_vs_full"] < 5e-2, r


def test_smoke_train_fit_and_inference(smoke):
    record, _ = smoke
    train = record["sections"]["c_train"]
    assert train["remat"] == "nothing_saveable"
    assert train["dtypes"]["params"] == "float32" and train["dtypes"]["compute"] == "bfloat16"
    (row,) = train["rows"]
    assert row["status"] == "ok" and row["tokens"] == 256 and row["frames"] == 8
    _finite_positive(row, "step_s", "tokens_per_s", "model_tflops", "mfu", "loss")
    assert row["compiled"]["total"] > 0 and row["compiled"]["alias"] > 0  # donated state
    fit = record["sections"]["d_fit"]
    assert fit["max_tokens"] == 256 and fit["limit_bytes"] > 0 and fit["probes"]
    assert fit["rows"][0]["status"] == "ok"
    _finite_positive(fit["rows"][0], "step_s", "tokens_per_s")
    (inf,) = record["sections"]["e_infer"]["rows"]
    assert inf["context"] == 256 and inf["decode_steps"] == 4
    _finite_positive(inf, "prefill_s", "prefill_tokens_per_s", "decode_ms_per_token")


def test_a_spent_budget_skips_the_sections_and_says_so(tmp_path):
    out = tmp_path / "s.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--budget", "0.5", "--out", str(out)],
        env=jax_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    record = json.loads(out.read_text())
    assert set(record["sections"]) == set(SECTIONS)
    for sec in record["sections"].values():
        assert sec["status"] == "skipped" and "budget" in sec["reason"]
    assert "skipped" in run.stdout


@pytest.fixture
def suite(monkeypatch):
    """The script imported in-process (as a CPU smoke run, so it sets nothing for the GPU)."""
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--cpu-smoke"])
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_suite")


def test_a_failing_section_is_recorded_and_the_next_runs(suite, monkeypatch, tmp_path):
    def broken(p, sec, ctx):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (stand-in)")

    def fine(p, sec, ctx):
        return {"rows": [{"impl": "x", "tokens": 1, "status": "ok"}, {"status": "error: boom"}]}

    monkeypatch.setitem(suite.SECTIONS, "a", broken)
    monkeypatch.setitem(suite.SECTIONS, "b", fine)
    args = suite.parse_args(["--cpu-smoke", "--sections", "ab", "--out", str(tmp_path / "o.json")])
    record = suite.run(args)
    a, b = record["sections"]["a_kernels"], record["sections"]["b_ring"]
    assert a["status"] == "error" and "RESOURCE_EXHAUSTED" in a["error"] and a["traceback"]
    assert b["status"] == "partial"  # a row's own error marks its section partial
    assert (
        json.loads((tmp_path / "o.json").read_text())["sections"]["a_kernels"]["status"] == "error"
    )
    assert "RESOURCE_EXHAUSTED" in suite.tables(record)


class _Trainer:
    """Stand-in for ``gpu_suite_model.Trainer``: bytes = fixed + per_token * tokens."""

    def __init__(self, fixed: int, per_token: int, known=()):
        self.fixed, self.per_token = fixed, per_token
        self.probes, self.compiled, self.last_compile_s = {}, [], 0.0
        for t in known:
            self.compile(t)
        self.compiled.clear()

    def compile(self, seq_len: int):
        self.compiled.append(seq_len)
        memory = {"total": self.fixed + self.per_token * seq_len}
        self.probes[seq_len] = SimpleNamespace(memory=memory, seq_len=seq_len, frames=1)
        return self.probes[seq_len]


class _Forever:
    def over(self, estimate: float = 0.0) -> bool:
        return False


def test_fit_search_doubles_then_bisects(suite):
    model = suite.gpu_suite_model
    p = SimpleNamespace(fit_granularity=1024, fit_max_compiles=8, train_lengths=(4096,))
    # Fits up to (100_000 - 20_000) / 3 = 26_666 tokens: 26_624 at 1024 granularity.
    tr = _Trainer(20_000, 3, known=(4096, 8192))
    best, log = model.search_fit(p, _Forever(), tr, 100_000)
    assert best == 26624
    assert tr.compiled[:2] == [16384, 32768]  # doubling from the largest known fit
    assert len(tr.compiled) <= 4  # interpolation lands next to the boundary at once
    assert [x["tokens"] for x in log][:2] == [4096, 8192]  # section c's probes are logged
    # Nothing known and the first length too big: halving down to a fit, then bisection.
    tr = _Trainer(20_000, 3)
    best, _ = model.search_fit(
        SimpleNamespace(**{**vars(p), "train_lengths": (65536,)}), _Forever(), tr, 100_000
    )
    assert best == 26624
    # Out of compiles: the best length tested so far.
    tr = _Trainer(20_000, 3, known=(4096,))
    few = SimpleNamespace(**{**vars(p), "fit_max_compiles": 1})
    assert model.search_fit(few, _Forever(), tr, 100_000)[0] == 8192
