"""Loss curves of training runs as a PNG, from their ``metrics.jsonl`` (matplotlib, Agg backend).

Stages are drawn one after another on a shared x axis (global step), with the learning rate and
gradient norm in smaller panels and skipped (non-finite) steps marked. ``loss_drop`` summarises
a run's learning for the demo's printout. The CLI is ``scripts/plot_metrics.py``.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_run(path: Path) -> list[dict]:
    """The last record of every step of one run, in step order (events skipped)."""
    p = path / "metrics.jsonl" if path.is_dir() else path
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    recs: dict[int, dict] = {}
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "step" in r and "event" not in r:
                recs[int(r["step"])] = r
    return [recs[k] for k in sorted(recs)]


def plot(runs: list[Path], out: Path, title: str | None = None) -> None:
    """Writes the figure for ``runs`` (in order) to ``out``."""
    # Imported here: the Agg backend must be chosen before pyplot loads, and callers of
    # read_run or loss_drop need not load matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        3, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    offset = 0
    for run in runs:
        recs = read_run(run)
        if not recs:
            continue
        name = run.name if run.is_dir() else run.parent.name
        x = [offset + r["step"] for r in recs]
        axes[0].plot(x, [r["loss"] for r in recs], label=name)
        axes[1].plot(x, [r["lr"] for r in recs])
        axes[2].plot(x, [r["grad_norm"] for r in recs])
        bad = [(xi, r["loss"]) for xi, r in zip(x, recs, strict=True) if not r.get("applied", True)]
        if bad:
            axes[0].scatter(*zip(*bad, strict=True), marker="x", color="red", zorder=3)
        axes[0].axvline(offset, color="grey", lw=0.5)
        offset = x[-1]
    axes[0].set_ylabel("loss (token mean)")
    axes[0].legend(fontsize="small")
    axes[1].set_ylabel("lr")
    axes[2].set_ylabel("grad norm")
    axes[2].set_xlabel("step (stages concatenated)")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def loss_drop(run: Path, fraction: float = 0.1) -> tuple[float, float]:
    """Mean loss of the first and of the last ``fraction`` of a run's applied steps.

    Raises:
      ValueError: the run has no applied step.
    """
    losses = [r["loss"] for r in read_run(run) if r.get("applied", True)]
    if not losses:
        raise ValueError(f"{run}: no applied training step in metrics.jsonl")
    k = max(1, round(len(losses) * fraction))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


__all__ = ["loss_drop", "plot", "read_run"]
