"""The resume fingerprint: what a run directory's checkpoints remember of the stage config.

A run directory resumes only with the config that wrote it. Each checkpoint's meta holds
``stage_fingerprint``: every stage field but the bookkeeping ones (:data:`RESUME_MUTABLE`), plus,
under ``resolved``, what the referenced model and data files resolved to and the mesh sizes, so
an edited YAML under the same path or a ``--mesh`` override counts. ``check_resume_config``
refuses a mismatch before anything compiles, naming the field and both values.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from longvila_jax.config.base import ConfigError, to_dict
from longvila_jax.config.train import StageConfig
from longvila_jax.train.resolve import ResolvedStage

# Stage fields a run may change when it resumes. They only affect logging, export, how (not
# what) it checkpoints, where the run directory lives (it may be moved), and what the backward
# recomputes. Everything else
# must match the checkpoint. ``steps`` is not here: the cosine LR schedule spans ``steps``, so
# extending it would change the LR of steps already taken.
RESUME_MUTABLE = (
    "log_every",
    "tensorboard",
    "export_vila",
    "checkpoint.async_save",
    "run_dir",
    "upstream",  # the upstream figures a stage is checked against, not what it trains
    "data.inline.fail_fast",  # debugging switch: it only stops a run, never changes its rows
    # Rematerialisation trades memory for recomputation; every policy computes the same loss
    # and gradients (tests/models/test_remat_policies.py), so a resume may switch it (e.g. to
    # fit a longer row after an OOM).
    "remat",
)

# The same choice as it lands in the resolved model config (``resolve.model_overrides``), and
# the model YAML's own ``remat``: dropped from both fingerprints like the fields above.
_RESOLVED_FREE = ("resolved.model.remat",)


def _drop_mutable(d: Any) -> Any:
    if not isinstance(d, dict):
        return d
    d = copy.deepcopy(d)
    for dotted in (*RESUME_MUTABLE, *_RESOLVED_FREE):
        *parents, leaf = dotted.split(".")
        node = d
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return d


# Resolved data fields that never change which rows a step sees: buffer sizes, and
# ``fail_fast`` (it only turns a skipped sample into an error; the CLI's --fail-fast sets it).
_RESOLVED_MUTABLE = ("worker_buffer_size", "read_buffer_size", "fail_fast")


def stage_fingerprint(stage: StageConfig, resolved: ResolvedStage | None = None) -> dict[str, Any]:
    """The config a resumed run must share with the checkpoint: every stage field but
    :data:`RESUME_MUTABLE` and, given ``resolved``, under ``resolved`` what the referenced
    files hold (the model and data configs, so an edited YAML under the same path counts) and
    the mesh axis sizes (so a CLI ``--mesh`` override counts too)."""
    fp = _drop_mutable(to_dict(stage))
    if resolved is not None:
        data = {k: v for k, v in to_dict(resolved.data).items() if k not in _RESOLVED_MUTABLE}
        contents = {"model": to_dict(resolved.model), "data": data, "mesh": resolved.mesh_sizes}
        fp["resolved"] = json.loads(json.dumps(contents))  # as the checkpoint meta stores it
    return fp


_MISSING = "<absent>"


def fingerprint_diff(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, saved value, current value)`` where two stage fingerprints differ,
    sorted by field; lists (e.g. ``trainable``) compare whole. :data:`RESUME_MUTABLE` fields
    are ignored (checkpoints written before a field became mutable still record it)."""
    if not prefix:
        saved, current = _drop_mutable(saved), _drop_mutable(current)
        if isinstance(saved, dict) and isinstance(current, dict) and "resolved" not in saved:
            current = {k: v for k, v in current.items() if k != "resolved"}  # older checkpoints
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [(prefix or "<stage>", saved, current)]
    out = []
    for k in sorted(set(saved) | set(current)):
        name = f"{prefix}.{k}" if prefix else k
        a, b = saved.get(k, _MISSING), current.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_diff(a, b, name))
        elif a != b:
            out.append((name, a, b))
    return out


def check_resume_config(saved: Any, current: dict, run_dir: Path, step: int) -> None:
    """Refuses to resume ``run_dir`` with a stage config other than the checkpoint's.

    Args:
      saved: the ``stage`` fingerprint stored in checkpoint ``step``'s meta.
      current: ``stage_fingerprint`` of the config being run.

    Raises:
      ConfigError: naming the first differing field (and listing the others), with both values.
    """
    diff = fingerprint_diff(saved, current)
    if not diff:
        return
    field, old, new = diff[0]
    others = f"; also differs: {', '.join(d[0] for d in diff[1:])}" if len(diff) > 1 else ""
    raise ConfigError(
        field,
        f"{run_dir}: checkpoint {step} was written with {field} = {old!r}, the config now has "
        f"{new!r}{others}. A run directory resumes only with the stage config that wrote it "
        f"(free to change: {', '.join(RESUME_MUTABLE)}); use a new run_dir instead.",
    )


__all__ = [
    "RESUME_MUTABLE",
    "check_resume_config",
    "fingerprint_diff",
    "stage_fingerprint",
]
