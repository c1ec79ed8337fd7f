"""Bad input is skipped (never substituted), counted exactly by reason, and rate-guarded."""

from __future__ import annotations

import json
import os
import shutil
import struct
import wave
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longvila_jax.data.pipeline import DataIterator
from longvila_jax.data.samples import INDEX_BITS
from longvila_jax.data.skips import SkipRateExceeded, TooLongSample
from longvila_jax.data.video import write_video

N = 3  # instances per bad kind


def _turns(q="<video>\nWhat number appears?", a="7"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _build(root: Path, corpus: Path) -> dict[str, tuple[list[bytes], Counter, list[int]]]:
    """Writes bad manifests; returns {name: (lines, expected skip counts, good indices)}."""
    shutil.copytree(corpus / "tokenizer", root / "tokenizer")
    m = root / "media"
    m.mkdir()
    good_frames = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    write_video(m / "good.mp4", good_frames)
    data = (m / "good.mp4").read_bytes()
    mdat = data.find(b"mdat")
    size = struct.unpack(">I", data[mdat - 4 : mdat])[0]
    zeroed = bytearray(data)
    zeroed[mdat + 4 : mdat - 4 + size] = bytes(size - 8)
    outside = root.parent / f"{root.name}_outside.mp4"
    outside.write_bytes(data)
    for i in range(N):
        (m / f"empty{i}.mp4").write_bytes(b"")
        (m / f"trunc{i}.mp4").write_bytes(data[: len(data) // (2 + i)])
        (m / f"zero{i}.mp4").write_bytes(bytes(zeroed))
        with wave.open(str(m / f"audio{i}.mp4"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
            w.writeframes(bytes(1600))
        write_video(m / f"one{i}.mp4", good_frames[:1])
        os.mkfifo(m / f"hang{i}.mp4")

    vid, want_v = [], Counter()

    def add(reason, rec=None, raw=None):
        vid.append(raw if raw is not None else json.dumps(rec).encode())
        if reason:
            want_v[reason] += 1

    good_v = []
    for i in range(8):
        good_v.append(len(vid))
        add(None, {"id": f"g{i}", "video": "good.mp4", "conversations": _turns()})
    cases = {
        "missing_file": lambda i: {"video": f"nope{i}.mp4", "conversations": _turns()},
        "empty_file": lambda i: {"video": f"empty{i}.mp4", "conversations": _turns()},
        "unreadable_video": lambda i: {"video": f"trunc{i}.mp4", "conversations": _turns()},
        "no_video_stream": lambda i: {"video": f"audio{i}.mp4", "conversations": _turns()},
        "no_frames": lambda i: {"video": f"zero{i}.mp4", "conversations": _turns()},
        "frame_count_mismatch": lambda i: {
            "video": "good.mp4",
            "frame_count": 40 + i,
            "conversations": _turns(),
        },
        "bad_fps": lambda i: {
            "video": "good.mp4",
            "fps": [0, -0.5, -1.0][i],
            "conversations": _turns(),
        },
        "too_few_frames": lambda i: {"video": f"one{i}.mp4", "conversations": _turns()},
        "path_outside_root": lambda i: {
            "video": ["../../x.mp4", str(outside), "a/../../x.mp4"][i],
            "conversations": _turns(),
        },
        # A FIFO would block the decoder forever: refused before decoding (the sandbox's own
        # timeout on a hanging decoder is tested in test_data_media).
        "not_regular_file": lambda i: {"video": f"hang{i}.mp4", "conversations": _turns()},
        "too_long": lambda i: {"video": "good.mp4", "conversations": _turns(q="word " * 300)},
        "no_supervised_tokens": lambda i: {
            "video": "good.mp4",
            "conversations": _turns()[:1] * (i + 1),
        },
        "empty_text": lambda i: {"video": "good.mp4", "conversations": _turns(a=" " * i)},
    }
    for reason, make in cases.items():
        for i in range(N):
            add(reason, {"id": f"{reason}{i}", **make(i)})
    for _ in range(N):
        add("bad_text_encoding", raw=b'{"id": "enc", "video": "good\xff\xfe.mp4"}')
    # NaN is not JSON: the line is refused as a whole (hostile JSON), before fps is read.
    add("bad_record", raw=b'{"id": "nan", "video": "good.mp4", "fps": NaN, "q": "Q?", "a": "7"}')
    add("bad_record", raw=b"not json")
    add("bad_record", {"id": "nofields", "video": "good.mp4"})

    img, want_i, good_i = [], Counter(), []
    Image.fromarray(good_frames[0]).save(m / "good.png")
    for i in range(N):
        os.mkfifo(m / f"fifo{i}.png")
        Image.fromarray(good_frames[i]).save(m / f"c{i}.png")
        (m / f"c{i}.png").write_bytes((m / f"c{i}.png").read_bytes()[: 50 + 10 * i])
        _png_header_only(m / f"bomb{i}.png", 30000 + i, 30000)
    for i in range(6):
        good_i.append(len(img))
        img.append({"id": f"gi{i}", "image": "good.png", "conversations": _turns("<image>\nQ?")})
    for i in range(N):
        img.append({"image": f"c{i}.png", "conversations": _turns("Q?")})
        img.append({"image": f"bomb{i}.png", "conversations": _turns("Q?")})
        img.append({"image": "good.png", "conversations": _turns("<image>\n<image>\nQ?")})
        img.append({"image": "good.png", "caption": ""})
        img.append({"image": f"fifo{i}.png", "conversations": _turns("Q?")})
    want_i.update(
        {
            "corrupt_image": N,
            "image_too_large": N,
            "placeholder_mismatch": N,
            "empty_text": N,
            "not_regular_file": N,
        }
    )
    return {
        "videos": (vid, want_v, good_v),
        "images": ([json.dumps(r).encode() for r in img], want_i, good_i),
    }


def _run(make_config, root: Path, name: str, lines: list[bytes], **kw):
    (root / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    kind = "video" if name == "videos" else "image"
    kw = {"max_skip_rate": 1.0, **kw}
    cfg = make_config(
        root,
        root=str(root),
        shuffle=False,
        num_epochs=1,
        datasets=[{"name": name, "manifest": f"{name}.jsonl", "kind": kind, "media_root": "media"}],
        **kw,
    )
    it = DataIterator(cfg, 0, 1)
    got = [
        int(i) & ((1 << INDEX_BITS) - 1) for b in it for i in b["sample_index"].ravel() if i >= 0
    ]
    return it, got


@pytest.fixture(scope="module")
def bad_root(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "data.yaml").write_text((corpus / "data.yaml").read_text())
    return root, _build(root, corpus)


@pytest.mark.slow
def test_every_bad_video_kind_counted_exactly(bad_root, make_cfg):
    root, cases = bad_root
    lines, want, good = cases["videos"]
    assert len(want) == 15 and all(n == N for n in want.values())  # 15 kinds x 3 instances
    it, got = _run(make_cfg, root, "videos", lines, decode_timeout_s=2.0)
    assert dict(it.skip_counts) == dict(want)
    assert got == good  # every good sample exactly once, nothing substituted
    assert it.samples_seen == len(lines)


def test_every_bad_image_kind_counted_exactly(bad_root, make_cfg):
    root, cases = bad_root
    lines, want, good = cases["images"]
    it, got = _run(make_cfg, root, "images", lines)
    assert dict(it.skip_counts) == dict(want)
    assert got == good


def test_skip_rate_guard_aborts(bad_root, make_cfg):
    root, cases = bad_root
    lines, _, _ = cases["images"]
    with pytest.raises(SkipRateExceeded, match="max_skip_rate 1.0%.*top reasons"):
        _run(make_cfg, root, "images", lines, max_skip_rate=0.01, skip_window=10)


def test_too_long_policy_error_names_sample(bad_root, make_cfg):
    root, _ = bad_root
    rec = {"id": "long1", "image": "good.png", "conversations": _turns("word " * 300)}
    with pytest.raises(TooLongSample, match="images:long1"):
        _run(make_cfg, root, "images", [json.dumps(rec).encode()], too_long_policy="error")


def test_many_images_are_too_long_before_any_decoding(bad_root, make_cfg):
    # 5000 paths that do not exist: had any been opened, the skip would be missing_file.
    root, _ = bad_root
    paths = [f"none{i}.png" for i in range(5000)]
    rec = {"id": "many", "image": paths, "conversations": _turns("Q?")}
    it, got = _run(make_cfg, root, "images", [json.dumps(rec).encode()])
    assert dict(it.skip_counts) == {"too_long": 1} and got == []
    with pytest.raises(TooLongSample, match="images:many: 5000 images"):
        _run(make_cfg, root, "images", [json.dumps(rec).encode()], too_long_policy="error")
