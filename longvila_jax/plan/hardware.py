"""The cluster the planner plans for: devices, memory, link bandwidths, peak and achieved FLOP/s.

Presets (``PRESETS``) carry vendor figures; every number can be overridden on the command line
(``python -m longvila_jax.plan --preset h100-sxm --ib-gbps 25``). Bandwidths are GB/s (1e9
bytes) per GPU per direction, the unit of parallelism.md section 7.

Sources:
- H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU datasheet (2023): bf16 dense 989 TFLOP/s (the
  1,979 figure is with 2:4 sparsity), 80 GB HBM3, NVLink 4 900 GB/s bidirectional = 450 GB/s
  per direction. InfiniBand: DGX H100 user guide, one ConnectX-7 NDR 400 Gb/s port per GPU =
  50 GB/s per direction.
- H200 SXM 141 GB: NVIDIA H200 datasheet (2024): same compute and NVLink as H100 SXM, 141 GB
  HBM3e (about 140 GiB usable as reported by nvidia-smi, 143,771 MiB); same ConnectX-7 NDR.

Achieved efficiency (the fraction of peak a kernel reaches) is a parameter, not a constant of
the hardware: defaults ``MATMUL_EFFICIENCY`` 0.45 (large bf16 GEMMs in an XLA training step;
MaxText and the USP paper report 45-53% MFU for 7-8B models) and ``ATTENTION_EFFICIENCY`` 0.30
(flash attention inside a ring step with per-step switching and fp32 merges: ring-flash-attn
reaches 90% of its own ideal, itself about 1/3 of peak for the backward). When a GPU
measurement exists (``bench/results/gpu_suite.json``), :func:`measured_efficiency` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from longvila_jax.config.base import check

MATMUL_EFFICIENCY = 0.45
ATTENTION_EFFICIENCY = 0.30
GIB = 2**30
GPU_SUITE = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_suite.json"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One homogeneous GPU cluster.

    Attributes:
      nodes, devices_per_node: the device grid (Ulysses groups must stay inside a node).
      hbm_gib: memory per device, GiB; usable: the fraction the step may use (XLA's client
        preallocates 75% by default; training runs set XLA_PYTHON_CLIENT_MEM_FRACTION near 0.9).
      nvlink_gbps, ib_gbps: intra- / inter-node bandwidth per GPU per direction, GB/s.
      peak_tflops: dense bf16 peak per device, TFLOP/s.
      matmul_eff, attention_eff: achieved fractions of peak for GEMMs and attention blocks.
      hop_latency_us: fixed cost of one collective step (launch + sync), microseconds.
    """

    nodes: int = 1
    devices_per_node: int = 8
    hbm_gib: float = 80.0
    usable: float = 0.9
    nvlink_gbps: float = 450.0
    ib_gbps: float = 50.0
    peak_tflops: float = 989.0
    matmul_eff: float = MATMUL_EFFICIENCY
    attention_eff: float = ATTENTION_EFFICIENCY
    hop_latency_us: float = 10.0

    def __post_init__(self):
        for name in ("nodes", "devices_per_node"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("hbm_gib", "nvlink_gbps", "ib_gbps", "peak_tflops"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, f"must be > 0, got {value}")
        for name in ("usable", "matmul_eff", "attention_eff"):
            value = getattr(self, name)
            check(0 < value <= 1, name, f"must lie in (0, 1], got {value}")
        check(self.hop_latency_us >= 0, "hop_latency_us", "must be >= 0")

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def budget_bytes(self) -> float:
        """Bytes per device the step may use."""
        return self.hbm_gib * GIB * self.usable


PRESETS: dict[str, dict[str, float]] = {
    "h100-sxm": {"hbm_gib": 80.0, "nvlink_gbps": 450.0, "ib_gbps": 50.0, "peak_tflops": 989.0},
    "h200-sxm": {"hbm_gib": 140.0, "nvlink_gbps": 450.0, "ib_gbps": 50.0, "peak_tflops": 989.0},
}


def measured_efficiency(path: Path = GPU_SUITE, peak_tflops: float = 989.0) -> dict[str, float]:
    """Efficiencies from a GPU measurement JSON, or {} when the file is absent or unreadable.

    Keys read at the top level of the JSON object, or of its ``planner`` object when it has one
    (others are ignored):
      ``mfu``: achieved fraction of peak of the whole step -> ``matmul_eff``;
      ``matmul_tflops``: achieved GEMM TFLOP/s -> ``matmul_eff`` = value / peak;
      ``attention_tflops``: achieved attention TFLOP/s -> ``attention_eff`` = value / peak.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    if isinstance(raw.get("planner"), dict):  # a suite may keep these keys under "planner"
        raw = raw["planner"]
    out: dict[str, float] = {}

    def fraction(value) -> float | None:
        ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
        return float(value) if ok else None

    if (v := fraction(raw.get("mfu"))) is not None and v <= 1:
        out["matmul_eff"] = v
    if (v := fraction(raw.get("matmul_tflops"))) is not None:
        out["matmul_eff"] = min(1.0, v / peak_tflops)
    if (v := fraction(raw.get("attention_tflops"))) is not None:
        out["attention_eff"] = min(1.0, v / peak_tflops)
    return out


def make_cluster(preset: str | None = None, measured: Path | None = GPU_SUITE, **fields) -> Cluster:
    """A cluster from a preset, then measured efficiencies, then explicit ``fields`` (None
    values are ignored), later sources winning.

    Raises:
      ConfigError: an unknown preset or an out-of-range field.
    """
    base: dict[str, float] = {}
    if preset is not None:
        check(preset in PRESETS, "preset", f"unknown preset {preset!r} ({sorted(PRESETS)})")
        base.update(PRESETS[preset])
    peak = fields.get("peak_tflops") or base.get("peak_tflops", 989.0)
    if measured is not None:
        base.update(measured_efficiency(measured, peak))
    base.update({k: v for k, v in fields.items() if v is not None})
    return Cluster(**base)


__all__ = [
    "ATTENTION_EFFICIENCY",
    "Cluster",
    "GIB",
    "GPU_SUITE",
    "MATMUL_EFFICIENCY",
    "PRESETS",
    "make_cluster",
    "measured_efficiency",
]
