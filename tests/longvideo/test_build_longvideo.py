"""The long-video data engine end to end on the synthetic corpus' long videos.

With the oracle backends every QA of the manifest is checked against the ground truth by rules
written here, the manifest passes ``data.check`` and stage 5 trains on it. Through an
OpenAI-compatible stub on loopback (answering from the PNG frames' pixels as the oracle does),
timeouts, a 500 and malformed JSON cost nothing, a failed request is asked again by the rerun,
and the result equals the in-process oracle run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers.openai_stub import Fault, StubServer, last_user_text, png_frames
from helpers.stages import stage_dict

from longvila_jax.backends.oracle import answer_chat
from longvila_jax.config.base import from_dict, load_yaml
from longvila_jax.config.data import DataConfig, DatasetSpec
from longvila_jax.config.train import StageConfig
from longvila_jax.data.build_longvideo.__main__ import main
from longvila_jax.data.check import check_manifest
from longvila_jax.data.clips import TIMESTAMP_RE, parse_timestamp
from longvila_jax.data.synthetic import generate
from longvila_jax.data.synthetic_long import load_truth
from longvila_jax.train.loop import EXIT_OK, run_stage

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "teal")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("longvideo")
    generate(out, seed=0, size=64, n_images=4, n_videos=2, n_needles=(2, 1), n_long=2)
    # A damaged video and a short one beside the long ones: skipped and counted, not fatal.
    (out / "longvideos" / "broken.mp4").write_bytes(b"\x00\x00junk" * 64)
    shutil.copy(out / "videos" / "vid_0000.mp4", out / "longvideos" / "short.mp4")
    return out


def _run(corpus: Path, out: Path, *extra: str) -> dict:
    args = [str(corpus / "longvideos"), str(out), "--no-progress", "--writer-retries", "1"]
    assert main([*args, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "longvideo_sft.jsonl").read_text().splitlines()]


def _scene_at(truth: dict, t: float) -> dict:
    return next(s for s in truth["scenes"] if s["start_s"] <= t < s["end_s"])


def _check_against_truth(rec: dict, truth: dict) -> None:
    """Every fact a record states is true of the scenes of the clips it cites."""
    clips = rec["provenance"]["clips"]
    scenes = [
        s
        for s in truth["scenes"]
        if any(s["start_s"] < c["end_s"] and c["start_s"] < s["end_s"] for c in clips)
    ]
    question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    assert question.startswith("<video>\n")
    said = f"{question} {answer}".lower()
    for colour in COLOURS:
        if re.search(rf"\b{colour}\b", said):
            assert colour in {s["colour"] for s in scenes}, (colour, rec)
    for digit in re.findall(r"\bnumber (\d)\b", said):
        assert digit in {s["number"] for s in scenes}, (digit, rec)
    for ts in TIMESTAMP_RE.findall(f"{question} {answer}"):
        t = parse_timestamp(ts)
        assert any(int(c["start_s"]) <= t <= c["end_s"] for c in clips), (ts, rec)
    if rec["category"] == "needle":
        assert len(clips) == 1
        (scene,) = [s for s in scenes if s["start_s"] <= clips[0]["start_s"] < s["end_s"]]
        assert answer.rstrip(".").split()[-1] == scene["number"], rec
    if rec["category"] == "counting" and "squares" in question:
        t = parse_timestamp(TIMESTAMP_RE.search(question).group(1))
        assert int(answer.split()[0]) == _scene_at(truth, t)["shapes"], rec
    if rec["category"] == "actions":
        assert {d for d in ("left", "right") if d in answer} <= {s["direction"] for s in scenes}


def test_oracle_build_checks_trains_and_resumes(corpus, tmp_path):
    out = tmp_path / "oracle"
    summary = _run(corpus, out, "--captioner", "oracle", "--writer", "oracle")
    truths = {
        f"long_{k:04d}.mp4": load_truth(corpus / f"longvideos/long_{k:04d}.mp4") for k in (0, 1)
    }
    n_clips = sum(int(t["duration_s"] // 10) for t in truths.values())
    assert summary["videos"] == {"found": 4, "probed_ok": 2, "written": 2}
    assert summary["clips"] == n_clips and summary["captions"]["total"] == n_clips
    assert summary["skips"] == {"too_short": 1, "unreadable_video": 1}
    assert set(summary["qa"]) == {
        "summary",
        "temporal_order",
        "counting",
        "attributes",
        "actions",
        "causal",
        "needle",
    }
    # The oracle writes more pairs than the prompt's max_qa (16): only the surplus is dropped.
    assert set(summary["qa_dropped"]) == {"over_limit"}
    assert summary["backends"]["writer"]["failures"] == 0
    records = _records(out)
    assert len(records) == summary["records"] == sum(summary["qa"].values())
    assert len({r["id"] for r in records}) == len(records)
    for rec in records:
        truth = truths[rec["video"]]
        assert rec["fps"] == truth["fps"] and rec["frame_count"] == truth["frame_count"]
        prov = rec["provenance"]
        assert prov["models"] == {"captioner": ["oracle-captioner"], "writer": "oracle-writer"}
        assert prov["prompts"]["writer"]["version"] == "writer-v1"
        _check_against_truth(rec, truth)
    # Each video's summary record recounts its scenes in order.
    for video, truth in truths.items():
        (summ,) = [r for r in records if r["video"] == video and r["id"].endswith("#qa0")]
        answer = summ["conversations"][1]["value"]
        positions = [answer.index(f"number {s['number']}") for s in truth["scenes"]]
        assert positions == sorted(positions), answer

    # A rerun finds everything done: nothing is asked again and the manifest is the same.
    again = _run(corpus, out, "--captioner", "oracle", "--writer", "oracle")
    assert again["captions"]["made_this_run"] == 0 and again["writer"]["written_this_run"] == 0
    assert _records(out) == records
    # Other settings never mix with the journals: a new clip length must restart.
    assert (
        main(
            [
                str(corpus / "longvideos"),
                str(out),
                "--captioner",
                "oracle",
                "--writer",
                "oracle",
                "--clip-seconds",
                "5",
                "--no-progress",
            ]
        )
        == 1
    )

    # data.check accepts the manifest, and stage 5 trains a few steps on it.
    entry = summary["dataset"]
    cfg = from_dict(
        DataConfig,
        {
            **load_yaml(corpus / "data.yaml"),
            "num_video_frames": 8,
            "max_length": 512,
            "tokenizer_dir": "tokenizer",
        },
    )
    report = check_manifest(cfg, DatasetSpec(**entry))
    assert report["samples"] == len(records) and report["skipped"] == {}, report
    stage = stage_dict(
        corpus, tmp_path / "s5", name="s5_long", steps=2, seq_len=512, frames=8, trainable=[".*"]
    )
    stage["data"]["inline"].update(
        datasets=[entry],
        num_video_frames=8,
        max_frames_per_row=8,
        batch_size=1,
        max_segments_per_row=1,
    )
    assert run_stage(from_dict(StageConfig, stage), progress=False) == EXIT_OK
    lines = [json.loads(x) for x in (tmp_path / "s5" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 2 and all(x["loss"] > 0 for x in steps)


def _stub_answer(model: str, messages: list) -> str:
    role = model.removeprefix("oracle-")
    frames = png_frames(messages) if role == "captioner" else None
    return answer_chat(role, last_user_text(messages), frames)


def test_endpoint_faults_lose_nothing_and_the_rerun_resumes(corpus, tmp_path):
    reference = _records(_oracle_out(corpus, tmp_path))
    models = ("oracle-captioner", "oracle-writer")
    # Request 1 fails with a 500, request 2 outlasts the client's timeout, request 4 is not
    # JSON: each is retried and recovered. Then one clip's request fails for good (no retries
    # left), so its video waits; the rerun asks only for what is missing.
    faults = {1: Fault(status=500), 2: Fault(delay_s=3.0), 4: Fault(malformed="not_json")}
    with StubServer(_stub_answer, models=models, faults=faults) as stub:
        specs = [
            "--captioner",
            f"openai:{stub.url}#oracle-captioner",
            "--writer",
            f"openai:{stub.url}#oracle-writer",
            "--frame-size",
            "64",
            "--timeout-s",
            "1",
            "--backoff-s",
            "0.01",
            "--concurrency",
            "2",
        ]
        out = tmp_path / "stub"
        first = _run(corpus, out, *specs, "--retries", "2")
        cap = first["backends"]["captioner"]
        assert cap["retries"] >= 3 and cap["failures"] == 0
        assert first["captions"]["failed_this_run"] == {}
        got = _records(out)
        assert [r["conversations"] for r in got] == [r["conversations"] for r in reference]
        assert {r["provenance"]["models"]["writer"] for r in got} == {"oracle-writer"}
        assert all(
            len(png_frames(b["messages"])) == 8
            for b in stub.bodies
            if b["model"] == "oracle-captioner"
        )

        # A fresh build whose first caption request fails for good (retries 0).
        out2 = tmp_path / "stub2"
        stub.faults = {len(stub.bodies): Fault(status=500)}
        partial = _run(corpus, out2, *specs, "--retries", "0")
        assert partial["captions"]["failed_this_run"] == {"http_500": 1}
        assert partial["skips"]["missing_captions"] == 1 and partial["videos"]["written"] == 1
        asked = len(stub.bodies)
        stub.faults = {}
        done = _run(corpus, out2, *specs, "--retries", "0")
        new = stub.bodies[asked:]
        assert [b["model"] for b in new] == ["oracle-captioner", "oracle-writer"]
        assert done["captions"]["made_this_run"] == 1 and done["videos"]["written"] == 2
        assert [r["conversations"] for r in _records(out2)] == [
            r["conversations"] for r in reference
        ]


def _oracle_out(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "oracle_ref"
    _run(corpus, out, "--captioner", "oracle", "--writer", "oracle")
    return out


def test_bad_arguments_are_config_errors(corpus, tmp_path, capsys):
    base = [str(corpus / "longvideos"), str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--captioner", "/some/dir", "--writer", "oracle"]) == 2
    assert "local:/some/dir" in capsys.readouterr().err
    assert main([*base, "--captioner", "oracle", "--writer", "ftp://x"]) == 2
    assert (
        main([*base, "--captioner", "oracle", "--writer", "oracle", "--writer-prompt", "v9"]) == 2
    )
    assert main([*base, "--captioner", "oracle", "--writer", "oracle", "--limit", "0"]) == 2
    assert (
        main(
            [
                str(tmp_path / "missing"),
                str(tmp_path / "o"),
                "--captioner",
                "oracle",
                "--writer",
                "oracle",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "not a folder" in capsys.readouterr().err
