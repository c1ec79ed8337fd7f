"""The manifest-check CLI: JSON report of ok / skipped samples, sizes and throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longvila_jax.data import check


def _manifest(corpus: Path, tmp_path: Path) -> Path:
    lines = (corpus / "videos_qa.jsonl").read_text().splitlines()[:3]
    lines += [
        json.dumps({"id": f"m{i}", "video_path": f"videos/missing{i}.mp4", "q": "Q?", "a": "A"})
        for i in range(2)
    ]
    path = tmp_path / "videos_qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_reports_counts(corpus, tmp_path, capsys):
    path = _manifest(corpus, tmp_path)
    rc = check.main(
        [
            str(path),
            "--config",
            str(corpus / "data.yaml"),
            "--set",
            "decode_timeout_s=0",
            "--set",
            "num_video_frames=4",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 1  # 40% skipped > max_skip_rate 1%
    assert report["samples"] == 5 and report["samples_ok"] == 3
    assert report["skipped"] == {"missing_file": 2}
    assert report["skip_examples"]["missing_file"][0].startswith("videos_qa:m0")
    assert report["frames"] == {"min": 4, "median": 4.0, "max": 4}
    tpf = 4  # tokens_per_frame of the synthetic data.yaml
    text = report["text_tokens"]
    assert report["expanded_tokens"]["min"] == text["min"] + 4 * (tpf - 1)
    assert report["over_threshold"] is True and report["kind"] == "video"


@pytest.mark.slow
def test_check_module_entry_point(corpus):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "longvila_jax.data.check",
            "images.jsonl",
            "--config",
            str(corpus / "data.yaml"),
            "--limit",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["samples_ok"] == 4 and report["skipped"] == {}
    assert report["frames"]["max"] == 1
