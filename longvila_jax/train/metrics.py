"""Run observability: progress bar, ``metrics.jsonl`` and TensorBoard event files.

``metrics.jsonl`` gets one JSON object per step (appended; a resumed run re-logs the steps after
its checkpoint, so readers keep the *last* record of each step, see :func:`read_metrics`). Each
record holds the step, loss (and its float32 bit pattern, for bit-exact comparisons), LR, grad
norm, supervised and total tokens, the data pipeline's cumulative skipped samples by reason, the
non-finite counters, the consumed sample ids and a SHA-256 fingerprint of the global batch.
TensorBoard scalars are written with tensorboardX (no TensorFlow). Only process 0 writes.

The loop builds a record from :func:`batch_fields` (taken when the step is dispatched) and the
step's metrics (:func:`step_record`), which it reads one step late (``train.hooks.LateMetrics``),
so a record is written about one step after its step ran; the throughput fields are measured
when it is written.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
_SCALARS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "steps_per_s")


def float_bits(x: float) -> str:
    """The float32 bit pattern of ``x`` as 8 hex digits."""
    return struct.pack(">f", np.float32(x)).hex()


def batch_fingerprint(batch: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the batch arrays (sorted keys; shape, dtype and bytes of each)."""
    h = hashlib.sha256()
    for k in sorted(batch):
        a = np.ascontiguousarray(batch[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sample_ids(batch: Mapping[str, np.ndarray]) -> list[int]:
    """Ids (``dataset << 40 | record``) of the samples packed in this batch, padding removed."""
    ids = np.asarray(batch.get("sample_index", np.zeros((0,), np.int64))).reshape(-1)
    return [int(i) for i in ids if i >= 0]


def batch_fields(batch: Mapping[str, np.ndarray], skip_counts: Mapping[str, int]) -> dict:
    """The host-side fields of a step record, taken when the step is dispatched.

    Args:
      batch: the host batch of the step (``segment_ids`` [rows, length], ``sample_index``...).
      skip_counts: the data iterator's skipped samples by reason after drawing ``batch``.
    """
    return {
        "tokens_total": int((np.asarray(batch["segment_ids"]) > 0).sum()),
        "skipped_samples": dict(skip_counts),
        "sample_ids": sample_ids(batch),
        "batch_sha256": batch_fingerprint(batch),
    }


def step_record(step: int, values: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
    """One ``metrics.jsonl`` step record (before :meth:`MetricsWriter.write` adds throughput).

    Args:
      step: completed steps after this one (1-based).
      values: the step's metrics read to the host (``train.step``: scalars).
      fields: :func:`batch_fields` of its batch.
    """
    return {
        "step": step,
        "loss": float(values["loss"]),
        "loss_bits": float_bits(values["loss"]),
        "lr": float(values["lr"]),
        "grad_norm": float(values["grad_norm"]),
        "tokens": float(values["tokens"]),
        "applied": bool(values["applied"]),
        "nonfinite": int(values["nonfinite"]),
        "consecutive_nonfinite": int(values["consecutive_nonfinite"]),
        "empty_batches": int(values["empty"]),
        **fields,
    }


class MetricsWriter:
    """Writes per-step records and drives the progress bar.

    Args:
      run_dir: run directory (``metrics.jsonl`` and ``tb/`` go there).
      total_steps: steps of the stage (for the bar's ETA).
      start_step: first step this process runs (after a resume).
      tensorboard: also write TensorBoard event files.
      enabled: False on non-primary processes.
      progress: show a progress bar (tqdm).
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._tokens = 0.0
        self._steps = 0
        self._file = self.path.open("a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
        self._bar = None
        if enabled and progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one step record (adds throughput fields) and advances the bar."""
        now = time.perf_counter()
        self._steps += 1
        self._tokens += float(record.get("tokens_total", 0))
        elapsed = max(now - self._t0, 1e-9)
        record = dict(record)
        record["steps_per_s"] = self._steps / elapsed
        record["tokens_per_s"] = self._tokens / elapsed
        record["time"] = time.time()
        self._last = now
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k in _SCALARS:
                if k in record and record[k] is not None:
                    self._tb.add_scalar(f"train/{k}", float(record[k]), record["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                steps_s=f"{record['steps_per_s']:.2f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )

    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (resume, checkpoint, halt, preemption) in ``metrics.jsonl``."""
        if self.enabled:
            self._file.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def read_metrics(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> the last record logged for that step (events are skipped)."""
    out: dict[int, dict[str, Any]] = {}
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "step" in rec and "event" not in rec:
            out[int(rec["step"])] = rec
    return out


__all__ = [
    "METRICS_FILE",
    "MetricsWriter",
    "batch_fields",
    "batch_fingerprint",
    "float_bits",
    "read_metrics",
    "sample_ids",
    "step_record",
]
