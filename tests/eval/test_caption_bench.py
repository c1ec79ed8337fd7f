"""The caption benchmark (``python -m longvila_jax.eval.caption``): strict parsing of judge
answers, the bootstrap intervals, retries of malformed answers, bad references, and an end-to-end
run with the oracle captioner and judge on long synthetic videos."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from longvila_jax.backends.base import BackendError, ChatReply, Usage
from longvila_jax.data.synthetic_long import generate_long, reference_caption
from longvila_jax.eval import caption
from longvila_jax.eval.caption_judge import (
    PROMPTS_DIR,
    MalformedScores,
    bootstrap_ci,
    load_prompt,
    parse_scores,
    render_judge,
    summarize,
)

GOOD = {"correctness": 4, "detail": 3, "context": 5}


# (a) strict parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"correctness": 4, "detail": 3, "context": 5}',
        '  {"context": 5, "detail": 3, "correctness": 4}\n',
        '```json\n{"correctness": 4, "detail": 3, "context": 5}\n```',
        '```\n{"correctness": 4, "detail": 3, "context": 5}\n```',
    ],
)
def test_parse_valid_and_fenced(text):
    assert parse_scores(text) == GOOD


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"correctness": 4, "detail": 3, "context": 5, "why": "ok"}', "extra ['why']"),
        ('{"correctness": 4, "detail": 3}', "missing ['context']"),
        ('{"correctness": 0, "detail": 3, "context": 5}', "'correctness' must be an integer 1-5"),
        ('{"correctness": 4, "detail": 6, "context": 5}', "'detail' must be an integer 1-5"),
        ('{"correctness": 4, "detail": 3.5, "context": 5}', "not 3.5"),
        ('{"correctness": 4.0, "detail": 3, "context": 5}', "not 4.0"),
        ('{"correctness": "4", "detail": 3, "context": 5}', "not '4'"),
        ('{"correctness": true, "detail": 3, "context": 5}', "not True"),
        ('{"correctness": 4, "correctness": 4, "detail": 3, "context": 5}', "duplicate key"),
        ("[4, 3, 5]", "not a JSON object but a list"),
        ("Scores: correctness 4, detail 3, context 5", "not a JSON object"),
        ('Here you go: {"correctness": 4, "detail": 3, "context": 5}', "not a JSON object"),
        ('```json\n{"correctness": 4, "detail": 3, "context": 5}\n``` thanks', "not a JSON"),
        ("", "not a JSON object"),
    ],
)
def test_parse_malformed(text, reason):
    with pytest.raises(MalformedScores, match=None) as info:
        parse_scores(text)
    assert reason in str(info.value)


def test_render_puts_texts_in_their_blocks_once():
    prompt = load_prompt("v1")
    text = render_judge(prompt, "the {candidate} reference", "the candidate")
    ref_block = text.split("<<<REFERENCE>>>")[1].split("<<<END REFERENCE>>>")[0]
    cand_block = text.split("<<<CANDIDATE>>>")[1].split("<<<END CANDIDATE>>>")[0]
    assert ref_block.strip() == "the {candidate} reference"  # one pass: stays literal
    assert cand_block.strip() == "the candidate"
    assert (
        prompt.sha256
        == hashlib.sha256((PROMPTS_DIR / "caption_judge_v1.yaml").read_bytes()).hexdigest()
    )


def test_prompt_template_without_markers_is_refused(tmp_path):
    src = (PROMPTS_DIR / "caption_judge_v1.yaml").read_text()
    (tmp_path / "caption_judge_v9.yaml").write_text(src.replace("<<<END CANDIDATE>>>", ""))
    with pytest.raises(ValueError, match="END CANDIDATE"):
        load_prompt("v9", tmp_path)
    with pytest.raises(ValueError, match="not a plain file name"):
        load_prompt("../v1", tmp_path)


# (b) means and bootstrap --------------------------------------------------------------------


def test_bootstrap_contains_the_mean_and_is_seeded():
    values = np.array([[1.0], [2.0], [2.0], [4.0], [5.0], [3.0]])
    lo, hi = bootstrap_ci(values, 2000, [0, 8])
    assert lo[0] <= 17 / 6 <= hi[0]
    assert 1.0 <= lo[0] < hi[0] <= 5.0
    lo2, hi2 = bootstrap_ci(values, 2000, [0, 8])
    assert (lo2[0], hi2[0]) == (lo[0], hi[0])
    lo3, hi3 = bootstrap_ci(values, 2000, [1, 8])
    assert (lo3[0], hi3[0]) != (lo[0], hi[0])
    # One video: every resample is that video.
    assert bootstrap_ci(np.array([[3.0, 4.0]]), 50, 0)[0].tolist() == [3.0, 4.0]


def test_summarize_means_by_hand():
    scores = [
        {"correctness": 5, "detail": 4, "context": 3},
        {"correctness": 3, "detail": 2, "context": 1},
        {"correctness": 4, "detail": 3, "context": 5},
    ]
    out = summarize(scores, 500, [0, 2])
    assert out["correctness"]["mean"] == pytest.approx(4.0)
    assert out["detail"]["mean"] == pytest.approx(3.0)
    assert out["context"]["mean"] == pytest.approx(3.0)
    # Per video (4, 2, 4) -> 10/3.
    assert out["overall"]["mean"] == pytest.approx(10 / 3)
    for name in ("correctness", "detail", "context", "overall"):
        lo, hi = out[name]["ci95"]
        assert lo <= out[name]["mean"] <= hi
    assert summarize([], 500, 0)["overall"] == {"mean": None, "ci95": None}


# (c) end to end with the oracles ------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("caption_corpus")
    truths = generate_long(out, seed=3, count=2, size=32, scenes=6)
    refs = {f"long_{i:04d}.mp4": reference_caption(t) for i, t in enumerate(truths)}
    refs_path = out / "refs.json"
    refs_path.write_text(json.dumps(refs))
    return out / "longvideos", refs_path


def test_end_to_end_oracle(corpus, tmp_path, capsys):
    videos, refs = corpus
    argv = ["--model", "oracle", "--judge", "oracle", "--videos", str(videos),
            "--references", str(refs), "--frames", "8,2,32", "--out", str(tmp_path / "out"),
            "--bootstrap", "200"]  # fmt: skip
    assert caption.main(argv) == 0
    results = json.loads((tmp_path / "out" / "caption_scores.json").read_text())
    png = (tmp_path / "out" / "caption_scores.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    rows = results["summary"]
    assert [r["frames"] for r in rows] == [2, 8, 32]
    overall = [r["overall"]["mean"] for r in rows]
    assert overall == sorted(overall)
    # 2 frames see the first and the last of 6 scenes: 8/24 facts -> 2 on every dimension;
    # 32 frames (at most 7.7 frames apart) see every scene of 10 s (20 frames) or more -> 5.
    assert overall[0] == 2.0 and overall[-1] == 5.0
    assert all(r["judged"] == 2 and r["judge_failed"] == 0 for r in rows)
    entry = results["videos"]["long_0000.mp4"]["frames"]["32"]
    assert json.loads(entry["judge_answers"][0]["text"]) == entry["scores"]
    assert results["settings"]["prompt_sha256"] == load_prompt("v1").sha256
    assert results["usage"]["judge"]["requests"] == 6
    assert "overall" in capsys.readouterr().out


# (d) retries --------------------------------------------------------------------------------


class FakeCaptioner:
    name = "fake-captioner"

    def __init__(self):
        self.usage = Usage()

    def chat(self, requests):
        return [ChatReply(text=f"caption of {r.key}", model="fake") for r in requests]

    def close(self):
        pass


class ScriptedJudge:
    """Answers each key from its script in turn (the last entry repeats); records seeds."""

    name = "scripted-judge"

    def __init__(self, scripts: dict[str, list]):
        self.usage, self.scripts, self.seeds = Usage(), scripts, []

    def chat(self, requests):
        out = []
        for r in requests:
            video = r.key.split("@")[0]
            script = self.scripts[video]
            answer = script.pop(0) if len(script) > 1 else script[0]
            self.seeds.append((r.key, r.seed, r.temperature))
            if isinstance(answer, str):
                out.append(ChatReply(text=answer, model="judge"))
            else:
                out.append(BackendError(r.key, "timeout", "no answer"))
        return out

    def close(self):
        pass


def _run(judge, retries=2):
    videos = {"a.mp4": ("/nowhere/a.mp4", 60.0), "b.mp4": ("/nowhere/b.mp4", 60.0)}
    refs = {"a.mp4": "ref a", "b.mp4": "ref b"}
    return caption.run_benchmark(
        FakeCaptioner(), judge, load_prompt("v1"), videos, refs, [4],
        seed=10, resamples=100, judge_retries=retries,
    )  # fmt: skip


def test_malformed_then_valid_is_retried_and_scored():
    judge = ScriptedJudge({
        "a.mp4": ["Sure! correctness 5", None, '{"correctness": 5, "detail": 5, "context": 5}'],
        "b.mp4": ['{"correctness": 1, "detail": 2, "context": 3}'],
    })  # fmt: skip
    results = _run(judge)
    a = results["videos"]["a.mp4"]["frames"]["4"]
    assert a["scores"] == {"correctness": 5, "detail": 5, "context": 5}
    assert [x["attempt"] for x in a["judge_answers"]] == [0, 1, 2]
    assert a["judge_answers"][0]["text"] == "Sure! correctness 5"
    assert a["judge_answers"][0]["error"].startswith("malformed:")
    assert a["judge_answers"][1]["error"] == "timeout: no answer"
    # New seed per attempt, sampled retries.
    prompt = load_prompt("v1")
    assert [s for s in judge.seeds if s[0] == "a.mp4@4"] == [
        ("a.mp4@4", 10, prompt.temperature),
        ("a.mp4@4", 11, prompt.retry_temperature),
        ("a.mp4@4", 12, prompt.retry_temperature),
    ]
    row = results["summary"][0]
    assert row["judged"] == 2 and row["judge_failed"] == 0
    assert row["correctness"]["mean"] == pytest.approx(3.0)  # (5 + 1) / 2
    assert row["overall"]["mean"] == pytest.approx(3.5)  # (5 + 2) / 2


def test_always_malformed_is_counted_never_zero(tmp_path):
    judge = ScriptedJudge({
        "a.mp4": ['{"correctness": 9, "detail": 5, "context": 5}'],
        "b.mp4": ['{"correctness": 2, "detail": 4, "context": 3}'],
    })  # fmt: skip
    results = _run(judge, retries=1)
    a = results["videos"]["a.mp4"]["frames"]["4"]
    assert a["scores"] is None and a["overall"] is None
    assert a["failure"] == "judge_failed"
    assert "'correctness' must be an integer 1-5" in a["failure_detail"]
    assert len(a["judge_answers"]) == 2
    row = results["summary"][0]
    assert row["judged"] == 1 and row["judge_failed"] == 1
    # Only b counts: a failed caption scored 0 would give 1.0, 2.0, 1.5.
    assert row["correctness"]["mean"] == 2.0
    assert row["detail"]["mean"] == 4.0
    assert row["context"]["mean"] == 3.0
    assert row["overall"]["mean"] == 3.0
    caption.write_outputs(results, tmp_path)  # the plot copes with one judged video
    assert (tmp_path / "caption_scores.png").stat().st_size > 0


# (e) bad input ------------------------------------------------------------------------------


def _main_with_refs(corpus, tmp_path, refs, capsys, extra=()):
    videos, _ = corpus
    path = tmp_path / "refs.json"
    path.write_text(refs if isinstance(refs, str) else json.dumps(refs))
    argv = ["--model", "oracle", "--judge", "oracle", "--videos", str(videos), "--references",
            str(path), "--frames", "2", "--out", str(tmp_path / "out"), *extra]  # fmt: skip
    code = caption.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _good_refs(corpus) -> dict:
    return json.loads(corpus[1].read_text())


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: list(r.values()), "must hold a JSON object"),
        (lambda r: {**r, "long_0000.mp4": "  "}, "'long_0000.mp4': the reference caption"),
        (lambda r: {**r, "long_0001.mp4": 7}, "'long_0001.mp4': the reference caption"),
        (lambda r: {**r, "../refs.json": "x"}, "'../refs.json' resolves outside"),
        (lambda r: {**r, "missing.mp4": "x"}, "'missing.mp4': no such video file"),
        (lambda r: {"long_0000.mp4": r["long_0000.mp4"]}, "have no reference caption"),
        (lambda r: "{not json", "invalid JSON"),
    ],
)
def test_bad_references_exit_1_naming_the_entry(corpus, tmp_path, capsys, mutate, needle):
    refs = mutate(_good_refs(corpus))
    code, err = _main_with_refs(corpus, tmp_path, refs, capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ")
    assert needle in err[0]
    assert not (tmp_path / "out" / "caption_scores.json").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--judge", "gpt4"], "--judge"),
        (["--frames", "0"], "--frames"),
        (["--judge-retries", "-1"], "--judge-retries"),
        (["--prompt-version", "v404"], "--prompt-version"),
    ],
)
def test_bad_arguments_exit_2(corpus, tmp_path, capsys, extra, needle):
    code, err = _main_with_refs(corpus, tmp_path, _good_refs(corpus), capsys, extra)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("config error: ") and needle in err[0]
