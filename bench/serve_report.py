"""bench/serve.py's report: the request plan of a concurrency level, per-level summaries
(TTFT percentiles, decode and aggregate tokens/s, 429s), the served-vs-loop answer comparison
and the markdown table. Pure Python and numpy (no jax), so ``tests/bench/test_serve_bench.py``
checks it in-process.
"""

from __future__ import annotations

import numpy as np

# Short questions of similar length: every prompt falls in one length bucket.
QUESTIONS = (
    "What number is shown?",
    "What colour is the video?",
    "Describe the video.",
    "Is it red or blue?",
    "How many frames are there?",
    "What happens first?",
    "What happens at the end?",
    "Is the number 42 or 7?",
)


def requests_of(clients: int, per_client: int) -> list[tuple[int, int, str]]:
    """(client, index, question) of one level, client by client."""
    return [
        (c, j, QUESTIONS[(c * per_client + j) % len(QUESTIONS)])
        for c in range(clients)
        for j in range(per_client)
    ]


def summary(rows: list[dict], wall: float) -> dict:
    """TTFT p50/p95, per-request decode tokens/s, aggregate tokens/s, outcomes."""
    ok = [r for r in rows if r["status"] == 200]
    ttft = [r["ttft_s"] for r in ok]
    rates = [r["decode_tok_s"] for r in ok if r["decode_tok_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in ok)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {
        "requests": len(rows),
        "ok": len(ok),
        "rejected_429": sum(r["status"] == 429 for r in rows),
        "failed": sum(r["status"] not in (200, 429) for r in rows),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "decode_tok_s_p50": pct(rates, 50),
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "wall_s": wall,
    }


def compare(level: dict) -> list[dict]:
    """The requests whose served answer differs from the loop's (429s are not compared)."""
    out = []
    for (c, j, q), s, p in zip(level["plan"], level["rows"], level["loop_rows"], strict=True):
        if s["status"] == 200 and (s["text"], s["completion_tokens"]) != (
            p["text"],
            p["completion_tokens"],
        ):
            out.append({"client": c, "index": j, "question": q, "served": s, "loop": p})
    return out


def _f(x, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def table(record: dict) -> str:
    lines = [
        "| clients | requests | path | TTFT p50 s | TTFT p95 s | decode tok/s per request (p50) "
        "| aggregate tok/s | 429 | wall s | mean batch | compiles while timed | answers = loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in record["levels"]:
        s, p = lv["served"], lv["loop"]
        same = f"{s['ok'] - len(lv['mismatches'])}/{s['ok']}"
        lines.append(
            f"| {lv['clients']} | {s['requests']} | server (HTTP, streamed) | "
            f"{_f(s['ttft_p50_s'])} | {_f(s['ttft_p95_s'])} | {_f(s['decode_tok_s_p50'], '.0f')} "
            f"| {_f(s['aggregate_tok_s'], '.0f')} | {s['rejected_429']} | {_f(s['wall_s'], '.2f')} "
            f"| {_f(lv['mean_batch_rows'], '.1f')} | {lv['compiles']} ({lv['compile_s']:.1f} s) "
            f"| {same} |"
        )
        lines.append(
            f"| {lv['clients']} | {p['requests']} | Generator loop (sequential) | "
            f"{_f(p['ttft_p50_s'])} | {_f(p['ttft_p95_s'])} | {_f(p['decode_tok_s_p50'], '.0f')} "
            f"| {_f(p['aggregate_tok_s'], '.0f')} | - | {_f(p['wall_s'], '.2f')} | 1 | - | - |"
        )
    return "\n".join(lines)
