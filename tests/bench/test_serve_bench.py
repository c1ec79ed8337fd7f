"""bench/serve.py's report logic (bench/serve_report.py) in-process, with stand-in rows
(nothing is served or compiled): request plans, summaries (percentiles, 429s, aggregate
tokens/s), the served-vs-loop answer comparison and the table's match column.

The end-to-end run (a server subprocess plus the Generator loop) takes about 20 s even at tiny
counts on two cores, so it is not run here; ``python bench/serve.py --clients 2 --requests 1
--max-tokens 4 --fast-compile`` is that smoke run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve_report.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(text="abc", tokens=4, ttft=0.1, rate=100.0, status=200):
    return {
        "status": status,
        "text": text,
        "completion_tokens": tokens,
        "ttft_s": ttft,
        "decode_tok_s": rate,
    }


def test_plan_gives_each_client_its_requests(bench):
    plan = bench.requests_of(3, 2)
    assert [(c, j) for c, j, _ in plan] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(q in bench.QUESTIONS for _, _, q in plan)
    assert len({q for _, _, q in plan}) == 6  # consecutive requests ask different questions


def test_summary_counts_outcomes_and_rates(bench):
    rows = [row(ttft=t) for t in (0.1, 0.2, 0.3, 0.4)] + [row(status=429), row(status=500)]
    s = bench.summary(rows, wall=2.0)
    assert (s["requests"], s["ok"], s["rejected_429"], s["failed"]) == (6, 4, 1, 1)
    assert s["ttft_p50_s"] == pytest.approx(0.25)
    assert s["ttft_p95_s"] == pytest.approx(0.385)
    assert s["completion_tokens"] == 16 and s["aggregate_tok_s"] == pytest.approx(8.0)
    assert bench.summary([row(status=429)], 1.0)["ttft_p50_s"] is None


def level(served_rows, loop_rows):
    plan = [(0, j, "q") for j in range(len(served_rows))]
    lv = {"clients": 1, "plan": plan, "rows": served_rows, "loop_rows": loop_rows}
    lv.update(wall_s=1.0, loop_wall_s=1.0, mean_batch_rows=1.0, compiles=0, compile_s=0.0)
    return lv


def test_a_different_served_answer_is_reported(bench):
    loop = [row("same"), row("same"), row("same", tokens=4)]
    served = [row("same"), row("other"), row("same", tokens=3)]
    lv = level(served, loop)
    bad = bench.compare(lv)
    assert [m["index"] for m in bad] == [1, 2]  # a different text, a different token count
    lv["served"], lv["loop"] = bench.summary(served, 1.0), bench.summary(loop, 1.0)
    lv["mismatches"] = bad
    text = bench.table({"levels": [lv]})
    assert "| 1/3 |" in text and "Generator loop (sequential)" in text
    # A 429 is not compared; matching answers give an empty list.
    lv = level([row("x"), row(status=429)], [row("x"), row("y")])
    assert bench.compare(lv) == []
