"""Recipe dry run: what one stage would do per optimizer step, computed without any device.

``python -m longvila_jax.train --config STAGE.yaml --dry-run`` resolves the stage exactly as a
run does (``resolve.resolve_stage``: every cross-file check, ``ConfigError`` naming the field)
but against the *planned* device count instead of the devices present, builds the model with
``nnx.eval_shape`` only (no device array, no compilation) and never opens the data, the
tokenizer or a checkpoint. It reports (:func:`plan`):

- the mesh, rows and samples per optimizer step, tokens per step, grad accumulation, lr, steps;
- trainable / frozen parameter counts (LoRA adapters count as trainable, their bases as frozen);
- the longest sample the data config admits and whether it fits ``seq_len``;
- the dtypes (``train.precision.DtypePolicy``) and the per-device parameter + optimizer bytes;
- the stage's ``upstream`` figures, when it has them.

Definitions (the honest reading of "samples per step" when rows are packed):

``max_sample_positions`` P. The pipeline (``data.samples``) admits a sample when it has at most
``max_frames_per_row`` frames, at most T = ``data.text_length`` input ids (``max_text_tokens``,
or the row length when 0) and at most the row length of expanded positions. Each frame costs
``tokens_per_frame + 1`` positions (its visual tokens and the "\\n" after them) and two of the
T ids (``<image>`` and "\\n"), so with F frames the text budget left is T - 2F and::

    P = F * (tokens_per_frame + 1) + (T - 2F) = T + F * (tokens_per_frame - 1)

F is the most frames one sample can carry: 0 for text-only mixtures, ``num_video_frames`` for
video (capped by ``max_frames_per_row``), ``max_frames_per_row`` for image/interleaved records.
``fits`` is P <= ``seq_len``: otherwise the longest admitted samples are dropped as too long.

``global_batch_samples`` = rows per step x samples per row. Rows per step is
``ResolvedStage.global_batch`` (``data.batch_size`` x data shards). Samples per row is how many
full-length samples fit one row: each budget of a row divided by what one full-length sample
uses of it, min(seq_len // P, ``max_segments_per_row``, ``max_frames_per_row`` // F, T // T).
The last term is 1: a full-length sample uses all T ids, and T bounds a row's text as well as
a sample's, so a row never holds two full-length samples (it may hold several shorter ones; the
report counts full-length ones, a lower bound on what packing achieves). ``tokens_per_step`` =
rows per step x ``seq_len``: the positions the step computes (padding included).

Per-device bytes (the train state as ``train.state`` lays it out). With ``shards(p)`` the number
of devices a parameter is split over by the mesh's ``param_rules`` (a dimension the mesh axes do
not divide stays replicated, as ``ModelTemplate.shardings``)::

    params    = sum_trainable size/shards * bytes(precision.params)
              + sum_frozen    size/shards * bytes(precision.frozen)
              + sum_lora      size        * bytes(precision.params)   (adapters are replicated)
    optimizer = 2 * (sum_trainable size/shards + sum_lora size) * bytes(precision.params)

(AdamW's two moments in the masters' dtype; activations, gradients and the accumulation buffer
are not included.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jax.sharding import AbstractMesh, AxisType

from longvila_jax.config.base import ConfigError, check
from longvila_jax.config.train import StageConfig
from longvila_jax.core.axes import MESH_AXES
from longvila_jax.train.precision import DtypePolicy
from longvila_jax.train.resolve import ResolvedStage, planned_devices, resolve_stage
from longvila_jax.train.state import ModelTemplate

# Devices of one host when the plan does not say otherwise: an 8-GPU node (and the 8 simulated
# CPU devices of the tests). It sets the process count, hence the data shards.
DEVICES_PER_HOST = 8


def max_frames(resolved: ResolvedStage) -> int:
    """The most frames (media) one sample of the stage's mixture can carry."""
    data = resolved.data
    most = 0
    for ds in data.datasets:
        if ds.kind == "text":
            continue
        n = data.num_video_frames if ds.kind == "video" else data.max_frames_per_row
        most = max(most, min(n, data.max_frames_per_row))
    return most


def sample_geometry(resolved: ResolvedStage) -> dict[str, int]:
    """Positions per frame, max frames, the longest admitted sample and samples per row."""
    data, seq_len = resolved.data, resolved.stage.seq_len
    tpf = data.tokens_per_frame
    frames = max_frames(resolved)
    text = data.text_length
    longest = text + frames * (tpf - 1)  # = frames * (tpf + 1) + (text - 2 * frames)
    # A full-length sample's ids: all T of them (see the module docstring).
    caps = [seq_len // longest, data.max_segments_per_row, text // text]
    if frames:
        caps.append(data.max_frames_per_row // frames)
    return {
        "positions_per_frame": tpf + 1,
        "max_frames": frames,
        "text_budget": text - 2 * frames,
        "max_sample_positions": longest,
        "samples_per_row": max(0, min(caps)),
    }


def param_bytes(resolved: ResolvedStage, policy: DtypePolicy) -> dict[str, Any]:
    """Parameter counts and per-device bytes of parameters and AdamW moments (see the module
    docstring for the formula)."""
    template = ModelTemplate.build(resolved.model)
    sizes = resolved.mesh_sizes
    mesh = AbstractMesh(
        tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 4
    )
    shardings = template.shardings(mesh, resolved.mesh.param_rules)
    trainable = set(resolved.trainable_paths)
    width = {k: np.dtype(getattr(policy, k)).itemsize for k in ("params", "frozen")}
    counts = {"trainable": 0, "frozen": 0, "lora": 0}
    per_device = {"trainable": 0, "frozen": 0, "lora": 0}
    whole = 0  # trainable elements no rule splits (a dimension that does not divide the mesh)
    for name in template.names:
        shape = template.shapes[name].shape
        local = math.prod(shardings[name].shard_shape(shape))
        part = "trainable" if name in trainable else "frozen"
        counts[part] += math.prod(shape)
        per_device[part] += local
        if part == "trainable" and local == math.prod(shape):
            whole += local
    if resolved.stage.lora is not None:
        rank = resolved.stage.lora.rank
        for name in resolved.lora_paths:
            *lead, fan_in, fan_out = template.shapes[name].shape
            counts["lora"] += math.prod(lead) * rank * (fan_in + fan_out)
        per_device["lora"] = counts["lora"]  # replicated (train.state.state_shardings)
    moving = per_device["trainable"] + per_device["lora"]
    params = moving * width["params"] + per_device["frozen"] * width["frozen"]
    optimizer = 2 * moving * width["params"]
    return {
        "trainable_params": counts["trainable"] + counts["lora"],
        "lora_params": counts["lora"],
        "frozen_params": counts["frozen"],
        "whole_trainable_params": whole,
        "bytes_per_device": {"params": params, "optimizer": optimizer, "total": params + optimizer},
    }


def plan(
    stage: StageConfig,
    *,
    mesh_path: str | None = None,
    devices: int | None = None,
    devices_per_host: int = DEVICES_PER_HOST,
) -> dict[str, Any]:
    """The dry-run report of ``stage`` (a JSON-serialisable dict; keys in the module docstring).

    Args:
      stage: the stage config.
      mesh_path: mesh YAML (default ``stage.mesh``).
      devices: the planned device count (default: the product of the mesh's sizes when none
        is -1).
      devices_per_host: local devices per process (Ulysses groups must fit in one).

    Raises:
      ConfigError: naming the field, as a run would before compiling; ``mesh`` when the device
        count is neither given nor fixed by the mesh.
    """
    check(devices_per_host >= 1, "devices_per_host", "must be >= 1")
    n = devices if devices is not None else planned_devices(stage, mesh_path)
    if n is None:
        raise ConfigError(
            "mesh", "a mesh axis is -1: set every size in mesh_set or pass --devices N"
        )
    check(n >= 1, "devices", "must be >= 1")
    per_host = min(devices_per_host, n)
    check(n % per_host == 0, "devices", f"{n} devices do not split into hosts of {per_host}")
    resolved = resolve_stage(
        stage,
        mesh_path=mesh_path,
        num_devices=n,
        process_count=n // per_host,
        devices_per_process=per_host,
        check_files=False,
    )
    geometry = sample_geometry(resolved)
    rows = resolved.global_batch
    policy = DtypePolicy.of(stage.precision, resolved.model)
    report: dict[str, Any] = {
        "stage": stage.name,
        "devices": n,
        "processes": n // per_host,
        "mesh": dict(resolved.mesh_sizes),
        "rows_per_step": rows,
        "samples_per_row": geometry["samples_per_row"],
        "global_batch_samples": rows * geometry["samples_per_row"],
        "tokens_per_step": rows * stage.seq_len,
        "grad_accum": stage.optim.grad_accum,
        "micro_batch_rows": resolved.micro_batch,
        "lr": stage.optim.lr,
        "schedule": stage.optim.schedule,
        "steps": stage.steps,
        **{k: v for k, v in geometry.items() if k != "samples_per_row"},
        "seq_len": stage.seq_len,
        "fits": geometry["max_sample_positions"] <= stage.seq_len,
        "precision": {
            "params": policy.params,
            "compute": policy.compute,
            "optimizer_state": policy.params,
            "frozen": policy.frozen,
        },
        **param_bytes(resolved, policy),
        "upstream": None,
    }
    if stage.upstream is not None:
        up = stage.upstream
        report["upstream"] = {
            "samples_per_step": up.samples_per_step,
            "lr": up.lr,
            "script": up.script,
        }
    return report


def table(report: dict[str, Any]) -> str:
    """A readable two-column rendering of :func:`plan`'s report."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        lines.append(f"{key:<22} {value}")
    return "\n".join(lines)


__all__ = ["DEVICES_PER_HOST", "max_frames", "param_bytes", "plan", "sample_geometry", "table"]
