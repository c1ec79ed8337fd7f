"""Draws the loss curves of one or more runs as a PNG from their ``metrics.jsonl``.

    python scripts/plot_metrics.py runs/demo/demo_s1 runs/demo/demo_s2 ... --out loss.png

Each argument is a run directory (or a ``metrics.jsonl``). Stages are drawn one after another on
a shared x axis (global step), with the learning rate and gradient norm in smaller panels and
skipped (non-finite) steps marked. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longvila_jax.train.plot import plot


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
