"""The README's main command: the tiny demo runs end to end and checks itself."""

from pathlib import Path

import pytest

from longvila_jax import demo


@pytest.mark.slow
def test_demo_runs_and_round_trips(tmp_path, monkeypatch):
    # A relative work directory, as in the README command (Orbax refuses relative paths, so
    # the checkpoint code must make them absolute).
    monkeypatch.chdir(tmp_path)
    summary = demo.run(Path("demo"), demo.DEFAULT_MODEL, frames=4, seed=1)
    assert summary["ok"]
    assert summary["round_trip_identical"]
    assert summary["max_abs_diff"] == 0.0
    # 4 frames x 4 visual tokens replace 4 placeholders in the prompt.
    assert summary["logits_shape"][2] == 512
