"""Fuzz: manifest records (``data.sources.parse_record``, ``data.samples.SampleProcessor``).

A tiny corpus is built once per module: a locally trained tokenizer, one 16 px PNG and one
8-frame mp4. Each example takes a valid video (conversations / captions / q+a), image,
interleaved or text record, mutates it and hands it to the processor of its kind's dataset (or
of another kind), either as a JSON object (what a JSON-list manifest yields: structured edits
with lone surrogates, huge ints, nan/inf, deep nesting, wrong types) or as the bytes of a JSONL
line (structured and byte-level edits, non-UTF-8 bytes, hostile documents), or with hostile
``fps`` / ``frame_count`` hints. Media paths may point to missing files or out of the root.
Videos are decoded sequentially or frame by frame with seeks (two processors).

The processor must return a sample or a skip marker with a named reason, never raise
(``too_long_policy: drop``). An ``error:<Type>`` skip is the transform's safety net catching an
unexpected exception: the test fails with that exception and its traceback (re-run under
``fail_fast``, which chains it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers.fuzz_mutations import FUZZ, Vocab, edits, pick
from helpers.fuzz_outcome import MAX_MESSAGE_CHARS, Hang, time_limit
from helpers.fuzz_texts import json_inputs
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from longvila_jax.config.base import from_dict
from longvila_jax.config.data import DataConfig
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.skips import REASONS, SampleError, SampleSkipped, is_skip
from longvila_jax.data.sources import parse_record
from longvila_jax.data.synthetic import train_tokenizer
from longvila_jax.data.video import write_video

SIZE = 32
TURNS = [{"from": "human", "value": "<video>\nWhat number?"}, {"from": "gpt", "value": "7"}]
IMAGE_TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
RECORDS = {  # (kind, record)
    "video_conv": ("video", {"id": "v1", "video": "videos/v.mp4", "conversations": TURNS}),
    "video_caps": ("video", {"id": 3, "video_id": "videos/v", "captions": ["A red."], "fps": 8.0}),
    "video_qa": ("video", {"video_path": "videos/v.mp4", "q": "Which?", "a": "red", "fps": 8}),
    "video_hint": (
        "video",
        {"video": "videos/v.mp4", "q": "Q?", "a": "A", "fps": 8, "frame_count": 8},
    ),
    "image_conv": ("image", {"id": "i1", "image": "images/a.png", "conversations": IMAGE_TURNS}),
    "image_caps": ("image", {"images": ["images/a.png", "images/a.png"], "caption": "two"}),
    "interleaved": (
        "interleaved",
        {"text": "<image> one <image> two", "images": ["images/a.png"] * 2},
    ),
    "text": ("text", {"id": "t1", "text": list(range(4, 40))}),
}
KINDS = ("video", "image", "interleaved", "text")
VIDEO_RECORDS = sorted(k for k, (kind, _) in RECORDS.items() if kind == "video")
HINTS = {  # hostile fps / frame_count hints (None: no hint)
    "fps": (None, 8, 5e-324, 1e-300, 1e-9, 0.5, 1e19, 1.7976931348623157e308, -0.0, math.nan)
    + (math.inf, 2**64, 0, True, "8"),
    "frame_count": (None, 8, 0, 1, 1000, 10**6, 2**31 - 1, 2**31, 2**64, -1, 8.0, [8]),
}
MEDIA = ("videos", "images", "videos/v.mp4/x", "/dev/zero", "/etc/passwd", "x" * 300, "a\x00b")
MEDIA += ("../../../../etc/passwd", "images/a.png\ud800", "videos/../images/a.png", "", [])
KEYS = {k for _, rec in RECORDS.values() for k in rec} | {"from", "value", "input_ids", "image"}
VOCAB = Vocab(
    keys=tuple(sorted(KEYS)),
    values=("videos/v.mp4", "videos/v", "images/a.png", "videos", "missing.png", "../a.png")
    + ("/etc/passwd", "images/../../x.png", "human", "gpt", "user", "assistant", "system")
    + ("<image>", "<image>\n<image>", "<video>", "<|im_start|>", "<|eot_id|>", 0, 3, 8, 10**6)
    + (TURNS[0], IMAGE_TURNS[1], [4, 5, 6], [-1], [2**63], 1e-300, 5e-324, 2**64, "\ud800"),
    fields={
        **dict.fromkeys(("video", "video_path", "video_id", "image", "images"), MEDIA),
        **HINTS,
        "text": ([2**64], [-(2**63)], [1.5], [True], ["a"], [None], list(range(10**4)), "x" * 9000),
    },
)


@st.composite
def record_cases(draw) -> tuple[str, str, object]:
    """(processor, dataset name, raw): a mutated record as a parsed object or as JSONL line
    bytes, for the processor that decodes videos sequentially or the one that seeks."""
    proc = pick(draw, ("sequential", "seeking"))
    kind, rec = RECORDS[pick(draw, sorted(RECORDS))]
    kind = pick(draw, (kind,) * 5 + KINDS)  # mostly the record's own kind
    mode = pick(draw, ("tweak", "object", "line", "hints"))
    if mode == "hints":  # hostile fps / frame_count hints on a valid video record
        rec = dict(RECORDS[pick(draw, VIDEO_RECORDS)][1])
        for key, hints in HINTS.items():
            hint = pick(draw, hints)
            if hint is None:
                rec.pop(key, None)
            else:
                rec[key] = hint
        return proc, "video", rec
    if mode == "tweak":  # the structure stays valid, so the values reach decoding/tokenising
        return proc, kind, draw(edits(rec, VOCAB, max_ops=2, ops=("tweak",)))
    if mode == "object":
        return proc, kind, draw(edits(rec, VOCAB))
    line = draw(json_inputs(rec, VOCAB))
    return proc, kind, line + pick(draw, (b"\n", b"", b"\r\n"))


@pytest.fixture(scope="module")
def processors(tmp_path_factory) -> dict:
    return setup(tmp_path_factory.mktemp("fuzz_records"))


def setup(root: Path) -> dict[str, SampleProcessor]:
    """Processors over a tiny corpus under ``root`` with one dataset per kind: ``sequential``
    and ``seeking`` (video frames sought one by one, fps-limited sampling), each also in a
    ``fail_fast`` variant that raises the exception behind an ``error:<Type>`` skip."""
    train_tokenizer(
        ["What number? What colour? Which? red one two A Q 0123456789"] * 4, root / "tok"
    )
    (root / "images").mkdir()
    (root / "videos").mkdir()
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(root / "images/a.png")
    write_video(root / "videos/v.mp4", np.full((8, SIZE, SIZE, 3), 90, np.uint8), fps=8)
    cfg = {
        "root": str(root),
        "tokenizer_dir": "tok",
        "datasets": [{"name": k, "manifest": f"{k}.jsonl", "kind": k} for k in KINDS],
        "image_size": SIZE,
        "tokens_per_frame": 4,
        "num_video_frames": 4,
        "max_length": 256,
        "max_frames_per_row": 8,
        "decode_timeout_s": 0.0,
        "too_long_policy": "drop",
    }
    variants = {"sequential": {}, "seeking": {"seek_gap_frames": 1, "max_fps": 2.0}}
    procs = {}
    for name, extra in variants.items():
        for fail_fast in (False, True):
            data = from_dict(DataConfig, {**cfg, **extra, "fail_fast": fail_fast})
            procs[name, fail_fast] = SampleProcessor(data)
        for kind, rec in RECORDS.values():  # the valid records are samples, not skips
            out = procs[name, False]({"dataset": kind, "index": 0, "raw": rec})
            assert not is_skip(out), (rec, out)
    return procs


def check_record(procs: dict, case: tuple[str, str, object]) -> None:
    name, kind, raw = case
    element = {"dataset": kind, "index": 5, "raw": raw}
    with time_limit():
        try:
            rec = parse_record(element)
            assert isinstance(rec, dict)
        except SampleSkipped as e:
            assert e.reason in REASONS
        out = procs[name, False](element)
        if is_skip(out) and out["skip_reason"] not in REASONS:
            # ``error:<Type>``: the transform caught an unexpected exception (its safety net).
            # That is a bug in the record parser: raise it with its traceback.
            if out["skip_reason"] == f"error:{Hang.__name__}":
                raise Hang(out["detail"])
            try:
                procs[name, True](element)
            except SampleError as e:
                raise (e.__cause__ or e) from None
            raise AssertionError(f"unexpected skip {out}")
    assert isinstance(out, dict)
    if is_skip(out):
        detail = out["detail"]
        assert len(detail) <= MAX_MESSAGE_CHARS, f"unbounded skip detail ({len(detail)} chars)"
        return
    ids, sup, frames = out["input_ids"], out["supervised"], out["frames"]
    assert ids.dtype == np.int32 and ids.ndim == 1 and sup.dtype == bool and sup.shape == ids.shape
    assert frames.dtype == np.uint8 and frames.shape[1:] == (SIZE, SIZE, 3)
    assert isinstance(out["sample_id"], str) and isinstance(out["sample_index"], int)


@FUZZ
@given(case=record_cases())
def test_manifest_record_mutations(processors, case):
    check_record(processors, case)
