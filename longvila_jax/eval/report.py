"""V-NIAH outputs: ``results.json`` and the frame-count x depth heatmap (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_heatmap(results: dict, path: str | Path) -> None:
    """Depth x frame-count heatmap of the cell scores (0 red .. 1 green), one PNG."""
    # Imported here: matplotlib is slow to import, and the headless Agg backend must be chosen
    # before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    scores = np.asarray(results["scores"], dtype=float)
    frames, depths = results["frame_counts"], results["depths"]
    cmap = LinearSegmentedColormap.from_list("vniah", ["#F0496E", "#EBB839", "#9ad5b3"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(frames) + 2), 0.6 * len(depths) + 1.8))
    im = ax.imshow(scores, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(frames)), [str(n) for n in frames])
    ax.set_yticks(range(len(depths)), [f"{round(d * 100)}" for d in depths])
    ax.set_xlabel("Num. of frames")
    ax.set_ylabel("Depth percent")
    ax.set_title(f"{results.get('title', 'V-NIAH')} (mean {results['mean_score']:.3f})")
    for i in range(len(depths)):
        for j in range(len(frames)):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: dict, out_dir: str | Path) -> None:
    """``out_dir/results.json`` and ``out_dir/heatmap.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_heatmap(results, out / "heatmap.png")
