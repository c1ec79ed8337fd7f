"""Counters and latencies of the server, served at ``GET /metrics`` in Prometheus' text format.

Every request that reaches ``/v1/chat/completions`` ends in exactly one outcome, counted under
``longvila_requests_total{outcome=...}``: ``ok``, ``rejected`` (429, queue full),
``bad_request`` (any other 4xx), ``cancelled`` (the client went away), ``timeout`` or
``error`` (5xx). So ``received == sum(outcomes) + in_flight`` at every scrape, which the tests
check. Latencies are sums and counts (a client divides them for means), as Prometheus
summaries without quantiles.
"""

from __future__ import annotations

import threading
import time

OUTCOMES = ("ok", "rejected", "bad_request", "cancelled", "timeout", "error")


class Metrics:
    """Thread-safe counters (the event loop and the scheduler thread both write them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.received = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.queued = 0  # admitted, waiting for decode or for the model
        self.running = 0  # rows in the batch being generated
        self.batches = 0
        self.batch_rows = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prefill_s = [0.0, 0]  # sum, count
        self.decode_s = [0.0, 0]  # sum of batch decode time, decode steps
        self.decode_tokens = 0  # tokens produced by decode steps (all rows)
        self.decode_media_s = [0.0, 0]

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def observe(self, name: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            pair = getattr(self, name)
            pair[0] += seconds
            pair[1] += count

    def finish(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def snapshot(self) -> dict:
        """A consistent copy of every value."""
        with self._lock:
            decode_sum = self.decode_s[0]
            return {
                "uptime_s": time.time() - self.started,
                "received": self.received,
                "outcomes": dict(self.outcomes),
                "queued": self.queued,
                "running": self.running,
                "batches": self.batches,
                "batch_rows": self.batch_rows,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "prefill_s": tuple(self.prefill_s),
                "decode_s": tuple(self.decode_s),
                "decode_media_s": tuple(self.decode_media_s),
                "decode_tokens_per_s": self.decode_tokens / decode_sum if decode_sum else 0.0,
            }

    def render(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        s = self.snapshot()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP longvila_{name} {help_}")
            lines.append(f"# TYPE longvila_{name} {kind}")
            lines.extend(f"longvila_{name}{labels} {value:g}" for labels, value in samples)

        metric(
            "requests_received_total", "counter", "chat requests received", [("", s["received"])]
        )
        metric(
            "requests_total",
            "counter",
            "chat requests finished, by outcome",
            [(f'{{outcome="{k}"}}', v) for k, v in s["outcomes"].items()],
        )
        metric("queue_length", "gauge", "admitted requests not yet generating", [("", s["queued"])])
        metric("running_requests", "gauge", "requests being generated", [("", s["running"])])
        metric("batches_total", "counter", "generation batches run", [("", s["batches"])])
        metric("batch_rows_total", "counter", "requests over all batches", [("", s["batch_rows"])])
        metric(
            "prompt_tokens_total",
            "counter",
            "prompt tokens, visual tokens included",
            [("", s["prompt_tokens"])],
        )
        metric(
            "completion_tokens_total", "counter", "generated tokens", [("", s["completion_tokens"])]
        )
        for name, key, help_ in (
            ("prefill_seconds", "prefill_s", "prefill to first token, per batch"),
            ("decode_step_seconds", "decode_s", "decode steps, per batch step"),
            ("media_decode_seconds", "decode_media_s", "media decoding, per request"),
        ):
            total, count = s[key]
            metric(name, "summary", help_, [("_sum", total), ("_count", count)])
        metric(
            "decode_tokens_per_second",
            "gauge",
            "decoded tokens per second of decode time",
            [("", s["decode_tokens_per_s"])],
        )
        metric("uptime_seconds", "gauge", "seconds since start", [("", s["uptime_s"])])
        return "\n".join(lines) + "\n"


__all__ = ["OUTCOMES", "Metrics"]
