"""The README's main command: the five-stage demo runs end to end (few steps, small corpus).

Learning itself (held-out accuracy well above chance) needs the full step budget and is
checked by the demo's own exit code when it runs from the README (see bench/RESULTS.md); here
every artefact and check of the pipeline is exercised.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longvila_jax import demo

SMALL = {"n_images": 8, "n_videos": 4, "n_needles": (8, 3), "needle_frames": 32}


@pytest.mark.slow
def test_demo_runs_all_stages_and_evaluations(tmp_path, monkeypatch):
    # A relative work directory, as in the README command (Orbax refuses relative paths).
    monkeypatch.chdir(tmp_path)
    summary = demo.run(Path("demo"), steps_scale=0.003, corpus=SMALL, vniah_needles=2)
    out = tmp_path / "demo"
    assert set(summary["stages"]) == set(demo.STAGES)
    for name in demo.STAGES:
        recs = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").open()]
        assert [r["step"] for r in recs if "loss" in r] == [1, 2]
        assert (out / "runs" / name / "final").is_dir()
    # The VILA export converts back to exactly the stage-5 weights.
    assert summary["export_max_abs_diff"] == 0.0
    assert (out / "runs/demo_s5/vila/config.json").is_file()
    for key in ("heldout_before", "heldout_after"):
        assert summary[key]["scored"] == 3 and summary[key]["skipped"] == {}
    vn = json.loads((out / "vniah/results.json").read_text())
    assert vn["frame_counts"] == [32, 64, 128]
    assert vn["mesh"] == {"data": 1, "fsdp": 1, "ring": 2, "ulysses": 4}
    assert np.asarray(vn["scores"]).shape == (6, 3)
    for png in (out / "loss.png", out / "vniah/heatmap.png"):
        assert Image.open(png).size[0] > 100
    assert json.loads((out / "summary.json").read_text()) == summary
