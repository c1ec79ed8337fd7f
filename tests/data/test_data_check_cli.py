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


def _hostile_text_manifest(corpus: Path, tmp_path: Path) -> Path:
    good = (corpus / "text.jsonl").read_bytes().splitlines()[:2]
    deep = b'{"id": "deep", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    big = b'{"id": "big", "text": [5, 18446744073709551616]}'  # 2**64
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join([good[0], big, deep, good[1]]) + b"\n")
    return path


def _check(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = check.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_check_reports_hostile_records(corpus, tmp_path, capsys):
    path = _hostile_text_manifest(corpus, tmp_path)
    rc, out, _ = _check(
        [str(path), "--config", str(corpus / "data.yaml"), "--kind", "text"], capsys
    )
    report = json.loads(out)
    assert rc == 1 and report["samples"] == 4 and report["samples_ok"] == 2
    assert report["skipped"] == {"bad_record": 2}
    examples = report["skip_examples"]["bad_record"]
    assert examples[0].startswith("hostile:big: token id 18446744073709551616")
    # Unparsed, so named by its line number.
    assert examples[1].startswith("hostile:2: manifest line: JSON nested deeper than 64")


def test_check_fail_fast_names_the_sample(corpus, tmp_path, capsys):
    path = _hostile_text_manifest(corpus, tmp_path)
    argv = [str(path), "--config", str(corpus / "data.yaml"), "--kind", "text", "--fail-fast"]
    rc, out, err = _check(argv, capsys)
    assert rc == 1 and not out
    assert err.startswith("error: sample hostile:big: bad_record") and err.count("\n") == 1


def test_check_config_and_manifest_errors(corpus, tmp_path, capsys):
    """Config problems exit 2, data problems 1, each with one line naming the file or field."""
    cfg = str(corpus / "data.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("root: [\n")
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1}')
    cases = [
        ([str(deep), "--config", str(bad_yaml)], 2, f"config error: --config: {bad_yaml}: invalid"),
        ([str(deep), "--config", cfg, "--set", "nope=1"], 2, "config error: nope: override"),
        ([str(tmp_path / "gone.json"), "--config", cfg, "--kind", "text"], 1, "gone.json does not"),
        ([str(deep), "--config", cfg, "--kind", "text"], 1, "'deep' manifest: "),
        ([str(broken), "--config", cfg, "--kind", "text"], 1, "broken.json: invalid JSON"),
    ]
    for argv, want_rc, fragment in cases:
        rc, out, err = _check(argv, capsys)
        assert (rc, out) == (want_rc, ""), (argv, err)
        assert fragment in err and err.count("\n") == 1, err
        assert err.startswith("config error: " if want_rc == 2 else "error: "), err
    assert "deeper than 64" in _check(cases[3][0], capsys)[2]
