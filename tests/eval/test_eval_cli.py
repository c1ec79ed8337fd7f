"""The evaluation command lines end to end (subprocesses, tiny model, synthetic inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers.eval_models import ROOT, make_model
from helpers.xla_env import FAST_COMPILE

from longvila_jax.core import trees
from longvila_jax.eval.cli import parse_numbers
from longvila_jax.eval.videomme import main as videomme_main
from longvila_jax.eval.vniah import main as vniah_main


def _run(args: list[str], *, devices: bool = True, timeout: int = 300):
    env = dict(os.environ)
    if not devices:  # the command must set up its simulated devices itself
        env["XLA_FLAGS"] = FAST_COMPILE
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def save_checkpoint(model, out: Path) -> Path:
    """A project checkpoint (``ckpt.orbax_io`` layout) of an in-memory model."""
    from longvila_jax.ckpt import orbax_io

    inv = {v: k for k, v in orbax_io.ATTR.items()}
    with orbax_io.checkpoint_dir(out) as tmp:
        orbax_io.write_metadata(tmp, model.cfg, {"source": {"layout": "random"}})
        writer = orbax_io.ParamWriter(tmp)
        for attr, sub in nnx.to_pure_dict(nnx.state(model)).items():
            for path, value in trees.leaves(sub):
                writer.save(inv[attr], path, np.asarray(value))
        writer.finalize()
    return out


def test_parse_numbers():
    assert parse_numbers("8,16, 32") == [8, 16, 32]
    assert parse_numbers("300:1200:300") == [300, 600, 900, 1200]
    assert parse_numbers("0:1:0.2", float) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_vniah_cli_reports_bad_model_dir(tmp_path, capsys):
    code = vniah_main(
        ["--model", str(tmp_path), "--haystack", "h.mp4", "--needles", "n", "--frames", "4"]
    )
    assert code == 2
    assert "neither a project checkpoint" in capsys.readouterr().err


def test_videomme_cli_reports_tampered_checkpoint(tmp_path, capsys):
    """A project checkpoint without its integrity manifest: one ``error:`` line, exit 2."""
    (tmp_path / "params").mkdir()
    (tmp_path / "model.yaml").write_text((ROOT / "configs/model/tiny-qwen2.yaml").read_text())
    code = videomme_main(
        ["--model", str(tmp_path), "--annotations", "a.json", "--videos", "v", "--frames", "4"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {tmp_path}: integrity check failed"), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_generator_clis(tmp_path):
    r = _run(
        [
            "longvila_jax.eval.needles",
            str(tmp_path / "n"),
            "--count",
            "3",
            "--kind",
            "mixed",
            "--haystack-seconds",
            "5",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "n/needles.jsonl").read_text().splitlines()]
    assert [r["question"].split()[4] for r in rows] == ["number", "word", "number"]
    from longvila_jax.eval.haystack import load_haystack

    assert load_haystack(tmp_path / "n/haystack.mp4", 5, 64).shape == (5, 64, 64, 3)
    r = _run(["longvila_jax.eval.videomme_synthetic", str(tmp_path / "v"), "--per-bucket", "1"])
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "v/videomme.json").read_text())
    assert len(rows) == 6 and all(
        (tmp_path / "v/videos" / f"{r['videoID']}.mp4").is_file() for r in rows
    )


@pytest.mark.slow
def test_vniah_cli_sequence_parallel(tiny_cfg, tokenizer, tokenizer_dir, haystack, rig, tmp_path):
    """A checkpoint rigged to answer "37" scores 1 in every cell of the SP run on 8 devices."""
    from longvila_jax.eval.needles import make_needles, write_needles
    from longvila_jax.infer.prompts import prompt_ids

    needle = make_needles(1, numbers=["37"])[0]
    write_needles(tmp_path / "needles", [needle])
    prompt = prompt_ids(tokenizer, needle.question, 7, template="qwen2", image_token_id=3)
    answer = tokenizer("37", add_special_tokens=False)["input_ids"]
    model = rig(make_model(tiny_cfg, 3), [int(prompt[-1]), *answer[:-1]], answer)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    r = _run(
        [
            "longvila_jax.eval.vniah",
            "--model",
            str(ckpt),
            "--tokenizer",
            str(tokenizer_dir),
            "--haystack",
            str(haystack),
            "--needles",
            str(tmp_path / "needles"),
            "--frames",
            "6",
            "--depths",
            "0,0.5,1",
            "--mesh",
            "configs/mesh/cpu8_r2u4.yaml",
            "--cpu-devices",
            "8",
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "3",
        ],
        devices=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert res["mesh"]["ring"] == 2 and res["mesh"]["ulysses"] == 4
    assert res["scores"] == [[1.0]] * 3
    assert [c["insert_at"] for c in res["cells"]] == [0, 3, 6]
    assert (tmp_path / "out/heatmap.png").stat().st_size > 1000
    assert "mean score 1.0000" in r.stdout


@pytest.mark.slow
def test_videomme_cli(tiny_model, tokenizer_dir, tmp_path):
    from longvila_jax.eval.videomme_synthetic import make_synthetic_videomme

    ann = make_synthetic_videomme(tmp_path / "set", per_bucket=1, fps=2, base_seconds=1)
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    r = _run(
        [
            "longvila_jax.eval.videomme",
            "--model",
            str(ckpt),
            "--tokenizer",
            str(tokenizer_dir),
            "--annotations",
            str(ann),
            "--videos",
            str(tmp_path / "set/videos"),
            "--frames",
            "4",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert {k: v["total"] for k, v in res["accuracy"].items()} == {
        "short": 2,
        "medium": 2,
        "long": 2,
        "overall": 6,
    }
    correct = sum(q["prediction"] == q["answer"] for q in res["questions"])
    assert res["accuracy"]["overall"]["correct"] == correct
    assert all(set(q["letter_logits"]) == {"A", "B", "C", "D"} for q in res["questions"])
    assert "VideoMME accuracy: short" in r.stdout
