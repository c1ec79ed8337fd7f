"""The oracle captioner and writer: captions from the truth sidecar, the writer's QA checked
against the ground truth by rules written here, errors in their own slots."""

from __future__ import annotations

import json
import re

import pytest

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, ClipMedia
from longvila_jax.backends.oracle import (
    OracleCaptioner,
    OracleWriter,
    answer_chat,
)
from longvila_jax.data.clips import (
    TIMESTAMP_RE,
    VideoInfo,
    clip_line,
    decode_clip,
    parse_timestamp,
    split_clips,
)
from longvila_jax.data.synthetic_long import generate_long, parse_caption

CATEGORIES = {"summary", "temporal_order", "counting", "attributes", "actions", "causal", "needle"}


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    truths = generate_long(out, seed=11, count=2, size=64)
    return [(str(out / f"longvideos/long_{v:04d}.mp4"), t) for v, t in enumerate(truths)]


@pytest.fixture
def hand_truth(tmp_path):
    """A sidecar written by hand (no video needed: the oracle reads only the truth)."""
    scenes = [
        {"index": 0, "start_s": 0.0, "end_s": 20.0, "colour": "red", "number": "7"},
        {"index": 1, "start_s": 20.0, "end_s": 30.0, "colour": "orange", "number": "2"},
    ]
    scenes[0].update(shapes=3, direction="right")
    scenes[1].update(shapes=1, direction="left")
    truth = {"version": 1, "fps": 2, "frame_count": 60, "size": 64, "duration_s": 30.0}
    (tmp_path / "hand.truth.json").write_text(json.dumps({**truth, "scenes": scenes}))
    return str(tmp_path / "hand.mp4")


def ask(path, start, end, frames=8, key="k"):
    return ChatRequest(key, "Describe the clip.", media=ClipMedia(path, start, end, frames))


def test_captioner_describes_the_clips_scene(hand_truth):
    cap = OracleCaptioner()
    red, orange, both = cap.chat(
        [ask(hand_truth, 10, 20), ask(hand_truth, 20, 30), ask(hand_truth, 15, 25)]
    )
    assert red.text == "A red scene shows the number 7 while 3 white squares move right."
    assert orange.text == "An orange scene shows the number 2 while 1 white square moves left."
    assert both.text == red.text + " Then an orange" + orange.text[len("An orange") :]
    assert red.model == "oracle-captioner" and cap.name == "oracle"
    # Two frames of [10, 30) land at 10 s and 29.5 s: one in each scene.
    (two,) = cap.chat([ask(hand_truth, 10, 30, frames=2)])
    assert [s["colour"] for s in parse_caption(two.text)] == ["red", "orange"]
    (one,) = cap.chat([ask(hand_truth, 0, 30, frames=1)])
    assert [s["number"] for s in parse_caption(one.text)] == ["7"]
    usage = cap.usage.as_dict()
    assert usage["requests"] == 5 and usage["failures"] == 0
    assert usage["completion_tokens"] == 13 * 3 + 27 * 2 and usage["prompt_tokens"] == 3 * 5


def test_whole_video_captions_see_more_scenes_with_more_frames(long_corpus):
    cap = OracleCaptioner()
    for path, truth in long_corpus:
        seen = []
        for frames in (2, 4, 8, 32):
            (reply,) = cap.chat([ask(path, 0, truth["duration_s"], frames)])
            scenes = parse_caption(reply.text)
            # What it says is the truth's scenes, in order, some possibly unseen.
            facts = [{k: s[k] for k in scenes[0]} for s in truth["scenes"]]
            it = iter(facts)
            assert all(any(s == f for f in it) for s in scenes)
            seen.append(len(scenes))
        assert seen == sorted(seen) and seen[0] <= 2
        assert seen[-1] == len(truth["scenes"])


def scene_at(truth, t):
    (s,) = [s for s in truth["scenes"] if s["start_s"] <= t < s["end_s"]]
    return s


def by_colour(truth, colour):
    (k,) = [k for k, s in enumerate(truth["scenes"]) if s["colour"] == colour]
    return k


def writer_prompt(path, truth, cap):
    clips = split_clips(VideoInfo(truth["duration_s"], truth["fps"], truth["frame_count"]))
    replies = cap.chat([ask(path, c.start_s, c.end_s, 8, f"clip-{c.index}") for c in clips])
    lines = [
        clip_line(c.index, c.start_s, c.end_s, r.text) for c, r in zip(clips, replies, strict=True)
    ]
    return clips, "Clip captions in order:\n" + "\n".join(lines) + "\nAnswer in JSON."


def check_qa(item, truth, spans):
    """Checks one QA against the truth with rules independent of the writer's code."""
    q, a, cited = item["question"], item["answer"], item["clips"]
    assert cited and len(set(cited)) == len(cited) and set(cited) <= set(spans)
    for ts in TIMESTAMP_RE.findall(q + " " + a):
        t = parse_timestamp(ts)
        assert any(spans[c][0] <= t <= spans[c][1] for c in cited), (ts, item)
    cat, scenes = item["category"], truth["scenes"]
    if cat == "counting":
        if m := re.fullmatch(r"How many white squares move across the screen at (\S+)\?", q):
            assert int(a) == scene_at(truth, parse_timestamp(m[1]))["shapes"]
        else:
            assert q == "How many scenes does the video show?" and int(a) == len(scenes)
    elif cat == "needle":
        m = re.fullmatch(r"What number is shown between (\S+) and (\S+)\?", q)
        lo, hi = parse_timestamp(m[1]), parse_timestamp(m[2])
        assert len(cited) == 1 and spans[cited[0]] == (lo, hi)
        numbers = {s["number"] for s in scenes if s["start_s"] < hi and s["end_s"] > lo}
        assert numbers == {a}
    elif cat == "temporal_order":
        m = re.fullmatch(r"Which colour comes right after the (\w+) scene\?", q)
        after = scenes[by_colour(truth, m[1]) + 1]["colour"]
        assert a == f"The {after} scene comes right after the {m[1]} scene."
    elif cat == "attributes":
        m = re.fullmatch(r"What colour is the background when the number (\d) is shown\?", q)
        (s,) = [s for s in scenes if s["number"] == m[1]]
        assert a == f"The background is {s['colour']}."
    elif cat == "actions":
        m = re.fullmatch(r"In which direction do the squares move during the (\w+) scene\?", q)
        assert a == f"The squares move {scenes[by_colour(truth, m[1])]['direction']}."
    elif cat == "causal":
        m = re.fullmatch(r"Why does the number change from (\d) to (\d) at (\S+)\?", q)
        t = parse_timestamp(m[3])
        before, after = scene_at(truth, t - 0.5), scene_at(truth, t)
        assert (before["number"], after["number"]) == (m[1], m[2]) and after["start_s"] == t
        assert f"from {before['colour']} to {after['colour']} at {m[3]}" in a
    else:
        assert cat == "summary" and a.startswith(f"The video shows {len(scenes)} scenes")
        assert parse_caption(a.split(" in turn. ", 1)[1]) == [
            {k: s[k] for k in ("colour", "number", "shapes", "direction")} for s in scenes
        ]


def test_writer_answers_are_true_by_the_ground_truth(long_corpus):
    cap, writer = OracleCaptioner(), OracleWriter()
    for path, truth in long_corpus:
        clips, prompt = writer_prompt(path, truth, cap)
        (reply,) = writer.chat([ChatRequest("video", prompt)])
        assert isinstance(reply, ChatReply) and reply.model == "oracle-writer"
        out = json.loads(reply.text)
        assert set(out) == {"summary", "qa"} and out["summary"]
        spans = {c.index: (c.start_s, c.end_s) for c in clips}
        for item in out["qa"]:
            check_qa(item, truth, spans)
        cats = [item["category"] for item in out["qa"]]
        assert set(cats) == CATEGORIES
        # Every clip gets a needle question, every scene a counting one.
        assert cats.count("needle") == len(clips)
        assert cats.count("counting") == len(truth["scenes"]) + 1
        questions = [" ".join(item["question"].lower().split()) for item in out["qa"]]
        assert len(set(questions)) == len(questions)
        assert answer_chat("writer", prompt) == reply.text


def test_errors_land_in_their_slots(long_corpus, hand_truth, tmp_path):
    cap = OracleCaptioner()
    path, truth = long_corpus[0]
    replies = cap.chat(
        [
            ChatRequest("no-media", "Describe."),
            ask(path, 0, 10, key="good"),
            ask(str(tmp_path / "nothing.mp4"), 0, 10, key="no-sidecar"),
            ask(hand_truth, 40, 50, key="past-the-end"),
        ]
    )
    assert isinstance(replies[1], ChatReply)
    kinds = [(r.key, r.kind) for r in replies if isinstance(r, BackendError)]
    assert kinds == [
        ("no-media", "no_truth"),
        ("no-sidecar", "no_truth"),
        ("past-the-end", "media"),
    ]
    assert "nothing.truth.json" in replies[2].detail
    assert cap.usage.as_dict()["requests"] == 4 and cap.usage.as_dict()["failures"] == 3

    writer = OracleWriter()
    _, prompt = writer_prompt(path, truth, cap)
    bad_caption = prompt.replace("scene shows", "scene has", 1)
    replies = writer.chat(
        [
            ChatRequest("none", "There are no clips here."),
            ChatRequest("ok", prompt),
            ChatRequest("bad", bad_caption),
        ]
    )
    assert isinstance(replies[1], ChatReply)
    assert [(r.key, r.kind) for r in (replies[0], replies[2])] == [
        ("none", "unparsable_captions"),
        ("bad", "unparsable_captions"),
    ]
    assert "clip 0" in replies[2].detail
    assert writer.usage.as_dict()["failures"] == 2


def test_answer_chat_captions_from_pixels_like_the_oracle(long_corpus):
    cap = OracleCaptioner()
    path, truth = long_corpus[1]
    for start, end, frames in [(0, 10, 8), (10, 40, 4), (0, truth["duration_s"], 3)]:
        pixels = decode_clip(path, 64, start, end, frames)
        (want,) = cap.chat([ask(path, start, end, frames)])
        assert answer_chat("captioner", "Describe the clip.", pixels) == want.text
    with pytest.raises(ValueError):
        answer_chat("judge", "Score this.")
    with pytest.raises(ValueError):
        answer_chat("captioner", "Describe the clip.", None)
