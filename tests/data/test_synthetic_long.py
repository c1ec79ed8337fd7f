"""Long synthetic videos: ground truth, the pixel reader, the caption grammar, hostile sidecars,
and the corpus generator's old files left byte-identical."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longvila_jax.core.errors import InputError
from longvila_jax.data.synthetic import generate
from longvila_jax.data.synthetic_long import (
    caption_for_scenes,
    frame_times,
    generate_long,
    load_truth,
    parse_caption,
    read_clip,
    read_scene,
    reference_caption,
    scenes_in_range,
)
from longvila_jax.data.video import decode_frames

FACTS = ("colour", "number", "shapes", "direction")


def facts(scene: dict) -> dict:
    return {k: scene[k] for k in FACTS}


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    return out, generate_long(out, seed=5, count=2, size=64)


def test_truth_tiles_the_video_on_ten_second_boundaries(long_corpus):
    out, truths = long_corpus
    listing = json.loads((out / "longvideos.json").read_text())
    assert [row["video"] for row in listing] == [
        "longvideos/long_0000.mp4",
        "longvideos/long_0001.mp4",
    ]
    for row, truth in zip(listing, truths, strict=True):
        video = out / row["video"]
        assert video.stat().st_size < 100_000
        assert load_truth(video) == truth
        assert truth["frame_count"] == truth["fps"] * truth["duration_s"]
        scenes = truth["scenes"]
        assert len(scenes) == 6 and scenes[0]["start_s"] == 0
        assert scenes[-1]["end_s"] == truth["duration_s"]
        for a, b in zip(scenes, scenes[1:], strict=False):
            assert a["end_s"] == b["start_s"]
            assert a["colour"] != b["colour"] and a["number"] != b["number"]
        for k, s in enumerate(scenes):
            assert s["index"] == k
            assert s["end_s"] - s["start_s"] in (10, 20) and s["start_s"] % 10 == 0
            assert s["colour"] != "gray" and 1 <= s["shapes"] <= 3
            assert s["direction"] in ("left", "right") and len(s["number"]) == 1


def test_pixel_reader_equals_truth_on_every_scene(long_corpus):
    out, truths = long_corpus
    for v, truth in enumerate(truths):
        frames = decode_frames(out / f"longvideos/long_{v:04d}.mp4", 64, lambda n, f: np.arange(n))
        assert len(frames) == truth["frame_count"]
        times = np.arange(len(frames)) / truth["fps"]
        assert read_clip(frames) == [facts(s) for s in truth["scenes"]]
        for s in truth["scenes"]:
            inside = np.flatnonzero((times >= s["start_s"]) & (times < s["end_s"]))
            assert read_scene(frames[inside]) == facts(s)
            # One frame is enough (the trail shows the direction), and so are two adjacent
            # frames between which the squares may not have moved a whole pixel.
            for i in (inside[0], inside[len(inside) // 2], inside[-1]):
                assert read_scene(frames[i : i + 1]) == facts(s)
            assert read_scene(frames[inside[3] : inside[5]]) == facts(s)
        # Sparse sampling over the whole video still reads every scene it lands in.
        picked = np.array([0, len(frames) // 2, len(frames) - 1])
        want = [facts(s) for s in scenes_in_range(truth, 0, 1e9, times[picked])]
        assert read_clip(frames[picked]) == want


def test_caption_wording_and_round_trip(long_corpus):
    one = {"colour": "red", "number": "7", "shapes": 3, "direction": "right"}
    two = {"colour": "orange", "number": "0", "shapes": 1, "direction": "left"}
    assert caption_for_scenes([one]) == (
        "A red scene shows the number 7 while 3 white squares move right."
    )
    assert caption_for_scenes([one, two]) == (
        "A red scene shows the number 7 while 3 white squares move right. Then an orange scene"
        " shows the number 0 while 1 white square moves left."
    )
    _, truths = long_corpus
    for truth in truths:
        for s in truth["scenes"]:
            text = caption_for_scenes([s])
            for word in (s["colour"], f"number {s['number']}", f"{s['shapes']} white"):
                assert word in text
            assert text.endswith(f"{s['direction']}.")
            assert parse_caption(text) == [facts(s)]
        everything = [facts(s) for s in truth["scenes"]]
        assert parse_caption(reference_caption(truth)) == everything
        assert parse_caption(caption_for_scenes(everything[2:5])) == everything[2:5]
        assert parse_caption("  " + reference_caption(truth) + "\n") == everything
    with pytest.raises(ValueError):
        caption_for_scenes([])


GOOD = "A red scene shows the number 7 while 3 white squares move right."


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        GOOD[:-1],
        GOOD + " Then",
        GOOD + " And more.",
        GOOD + GOOD,
        GOOD + " then a " + GOOD[2:],
        GOOD + " Then A " + GOOD[2:],
        GOOD.replace("right", "up"),
        GOOD.replace("red", "pink"),
        GOOD.replace("red", "RED"),
        GOOD.replace("A red", "An red"),
        GOOD.replace("red", "orange"),  # "A orange"
        GOOD.replace("3 white squares move", "1 white squares move"),
        GOOD.replace("3 white squares move", "1 white square move"),
        GOOD.replace("3 white squares move", "2 white square moves"),
        GOOD.replace("3 white", "0 white"),
        GOOD.replace("3 white", "12 white"),
        GOOD.replace("number 7", "number seven"),
        GOOD.replace("number 7", "number ٧"),  # a non-ASCII digit
        "a" + GOOD[1:],
        5,
    ],
)
def test_parse_caption_rejects_anything_else(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_frame_times_and_scenes_in_range():
    truth = {
        "fps": 2,
        "scenes": [
            {"start_s": 0.0, "end_s": 10.0, "colour": "red"},
            {"start_s": 10.0, "end_s": 30.0, "colour": "blue"},
        ],
    }
    assert frame_times(truth, [0, 19, 20, 59]).tolist() == [0.0, 9.5, 10.0, 29.5]
    colours = lambda a, b, t: [s["colour"] for s in scenes_in_range(truth, a, b, t)]
    assert colours(0, 10, [0.0, 9.5, 10.0]) == ["red"]
    assert colours(5, 30, [9.5, 29.5]) == ["red", "blue"]
    assert colours(10, 30, [9.5]) == []
    assert colours(0, 30, [12.0, 29.5]) == ["blue"]


def _valid_truth() -> dict:
    scene = {"index": 0, "start_s": 0.0, "end_s": 10.0, "colour": "red", "number": "7"}
    scene.update(shapes=3, direction="right")
    second = dict(scene, index=1, start_s=10.0, end_s=30.0, colour="blue")
    return {"version": 1, "fps": 2, "frame_count": 60, "size": 64, "duration_s": 30.0,
            "scenes": [scene, second]}  # fmt: skip


def _drop(key):
    return lambda t: t.pop(key)


HOSTILE = {
    "fps as string": ("fps", lambda t: t.update(fps="2")),
    "fps zero": ("fps", lambda t: t.update(fps=0)),
    "missing scenes": ("scenes", _drop("scenes")),
    "missing frame_count": ("frame_count", _drop("frame_count")),
    "unknown field": ("extra", lambda t: t.update(extra=1)),
    "version 2": ("version", lambda t: t.update(version=2)),
    "huge frame_count": ("frame_count", lambda t: t.update(frame_count=10**30)),
    "duration mismatch": ("duration_s", lambda t: t.update(duration_s=31.0)),
    "scenes empty": ("scenes", lambda t: t.update(scenes=[])),
    "scenes not a list": ("scenes", lambda t: t.update(scenes={"0": 1})),
    "scene not an object": ("scenes[1]", lambda t: t["scenes"].__setitem__(1, "blue")),
    "gap between scenes": ("scenes[1].start_s", lambda t: t["scenes"][1].update(start_s=12.0)),
    "short of the end": ("end_s", lambda t: t["scenes"][1].update(end_s=29.0)),
    "backwards scene": ("scenes[1].end_s", lambda t: t["scenes"][1].update(end_s=5.0)),
    "wrong index": ("scenes[1].index", lambda t: t["scenes"][1].update(index=0)),
    "unknown colour": ("scenes[0].colour", lambda t: t["scenes"][0].update(colour="pink")),
    "colour as list": ("scenes[0].colour", lambda t: t["scenes"][0].update(colour=["red"])),
    "number as int": ("scenes[0].number", lambda t: t["scenes"][0].update(number=7)),
    "huge shapes": ("scenes[0].shapes", lambda t: t["scenes"][0].update(shapes=10**400)),
    "shapes as bool": ("scenes[0].shapes", lambda t: t["scenes"][0].update(shapes=True)),
    "direction up": ("scenes[0].direction", lambda t: t["scenes"][0].update(direction="up")),
    "missing direction": ("scenes[1].direction", lambda t: t["scenes"][1].pop("direction")),
    "huge time": ("scenes[0].end_s", lambda t: t["scenes"][0].update(end_s=1e300)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sidecar_raises_input_error_naming_file_and_field(tmp_path, case):
    field, mutate = HOSTILE[case]
    truth = _valid_truth()
    video = tmp_path / "clip_0.mp4"
    (tmp_path / "clip_0.truth.json").write_text(json.dumps(truth))
    assert load_truth(video) == truth  # the unmutated sidecar is valid
    mutate(truth)
    (tmp_path / "clip_0.truth.json").write_text(json.dumps(truth))
    with pytest.raises(InputError) as err:
        load_truth(video)
    assert "clip_0.truth.json" in str(err.value)
    assert field in str(err.value)


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b'{"fps": NaN}', b'{"a": 1, "a": 2}', b"\xff"])
def test_unparsable_sidecar_raises_input_error(tmp_path, raw):
    (tmp_path / "v.truth.json").write_bytes(raw)
    with pytest.raises(InputError, match="v.truth.json"):
        load_truth(tmp_path / "v.mp4")
    with pytest.raises(InputError, match="missing.truth.json"):
        load_truth(tmp_path / "missing.mp4")


def test_generate_keeps_the_old_corpus_byte_identical(tmp_path):
    kw = dict(seed=3, size=32, n_images=2, n_videos=1, n_needles=(1, 1), needle_frames=8)
    generate(tmp_path / "a", n_short_needles=1, n_long=0, **kw)
    generate(tmp_path / "b", n_short_needles=1, n_long=2, **kw)
    old = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(old) > 10 and not (tmp_path / "a" / "longvideos").exists()
    for rel in old:
        if rel.name != "data.yaml":  # holds the absolute root
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    new = {p.name for p in (tmp_path / "b" / "longvideos").iterdir()}
    assert new == {"long_0000.mp4", "long_0000.truth.json", "long_0001.mp4", "long_0001.truth.json"}
    listing = json.loads((tmp_path / "b" / "longvideos.json").read_text())
    assert [load_truth(tmp_path / "b" / row["video"])["size"] for row in listing] == [32, 32]
