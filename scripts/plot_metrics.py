"""Draws the loss curves of one or more runs as a PNG from their ``metrics.jsonl``.

    python scripts/plot_metrics.py runs/demo/demo_s1 runs/demo/demo_s2 ... --out loss.png

Each argument is a run directory (or a ``metrics.jsonl``). Stages are drawn one after another on
a shared x axis (global step), with the learning rate and gradient norm in smaller panels and
skipped (non-finite) steps marked. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    p.add_argument("--out", type=Path, default=Path("loss.png"))
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    try:
        plot(a.runs, a.out, a.title)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
