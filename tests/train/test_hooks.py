"""The loop's hooks on hand-made step results (no model, no compilation).

Records are written one step late and flushed on demand; the non-finite halt stops at the same
step as a synchronous loop while reading a step early only when that step can reach the limit;
hooks run on their cadence and all of them on the final step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from longvila_jax.train.hooks import Hooks, LateMetrics, NonFiniteHalt, NonFiniteSteps, StepResult
from longvila_jax.train.metrics import MetricsWriter, batch_fields, read_metrics


def _result(step: int, consecutive: int = 0) -> StepResult:
    metrics = {
        "loss": np.float32(np.nan if consecutive else 1.5 + step),
        "lr": np.float32(1e-3),
        "grad_norm": np.float32(0.5),
        "tokens": np.float32(10.0),
        "applied": np.bool_(consecutive == 0),
        "nonfinite": np.int32(consecutive),
        "consecutive_nonfinite": np.int32(consecutive),
        "empty": np.int32(0),
    }
    batch = {
        "segment_ids": np.array([[1, 1, 0]], np.int32),
        "sample_index": np.array([[step, -1]], np.int64),
    }
    return StepResult(step, None, metrics, batch_fields(batch, {"too_long": step}))


class _Counting(LateMetrics):
    """LateMetrics that remembers which flushes read a step."""

    def __init__(self, writer):
        super().__init__(writer)
        self.reads: list[int] = []

    def flush(self) -> None:
        pending = self._pending
        super().flush()
        if pending is not None:
            self.reads.append(pending.step)


@pytest.fixture
def writer(tmp_path):
    w = MetricsWriter(tmp_path, 10, 0, tensorboard=False, progress=False)
    yield w
    w.close()


def test_records_are_written_one_step_late(writer):
    late = LateMetrics(writer)
    late(_result(1))
    assert read_metrics(writer.path) == {}  # step 1 waits for step 2's dispatch
    late(_result(2))
    assert sorted(read_metrics(writer.path)) == [1]
    late.flush()
    records = read_metrics(writer.path)
    assert sorted(records) == [1, 2]
    assert records[2]["sample_ids"] == [2] and records[2]["skipped_samples"] == {"too_long": 2}
    assert records[2]["tokens_total"] == 2 and records[2]["loss_bits"] == "40600000"  # 3.5
    late.flush()  # nothing pending: no second record
    assert len(writer.path.read_text().splitlines()) == 2


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_nonfinite_halt_stops_at_the_same_step_reading_early_only_when_it_can(writer, limit):
    # Counts of consecutive non-finite steps 1..7: a streak of 2, a finite step, then a streak.
    counts = [0, 1, 2, 0, 1, 2, 3]
    late = _Counting(writer)
    hooks = Hooks()
    hooks.add(late)
    hooks.add(NonFiniteHalt(late, limit))
    halting = next(i + 1 for i, c in enumerate(counts) if c >= limit)
    read_early = []  # steps read by their own hooks, before the next step is dispatched
    with pytest.raises(NonFiniteSteps) as stop:
        for step, count in enumerate(counts, start=1):
            try:
                hooks.run(_result(step, count), final=False)
            finally:
                if step in late.reads:
                    read_early.append(step)
    assert stop.value.fields == {"step": halting, "count": limit}
    assert str(stop.value) == f"halting: {limit} non-finite steps in a row"
    # Every step up to the halting one is logged, none after it.
    assert sorted(read_metrics(writer.path)) == list(range(1, halting + 1))
    # Only the launch's first step and the steps whose predecessor's count was limit - 1 or
    # more (those that can reach the limit) are read early; the others wait one step.
    can_halt = [s for s in range(2, halting + 1) if counts[s - 2] + 1 >= limit]
    assert read_early == [1, *can_halt]
    assert halting in read_early


def test_hooks_run_on_their_cadence_and_all_on_the_final_step():
    seen: dict[str, list[int]] = {"each": [], "third": []}
    hooks = Hooks()
    hooks.add(lambda r: seen["each"].append(r.step))
    hooks.add(lambda r: seen["third"].append(r.step), every=3)
    for step in range(1, 8):
        hooks.run(_result(step), final=step == 7)
    assert seen == {"each": [1, 2, 3, 4, 5, 6, 7], "third": [3, 6, 7]}


def test_step_records_keep_their_keys(writer):
    late = LateMetrics(writer)
    late(_result(1))
    late.flush()
    record = json.loads(writer.path.read_text())
    assert sorted(record) == sorted(
        [
            "applied",
            "batch_sha256",
            "consecutive_nonfinite",
            "empty_batches",
            "grad_norm",
            "loss",
            "loss_bits",
            "lr",
            "nonfinite",
            "sample_ids",
            "skipped_samples",
            "step",
            "steps_per_s",
            "time",
            "tokens",
            "tokens_per_s",
            "tokens_total",
        ]
    )
