"""Video sampling and decoding (PyAV), image loading (Pillow), the decode sandbox, and synthetic
media whose answers are readable from decoded frames."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
from helpers.limits import time_limit
from PIL import Image

from longvila_jax.core.faults import STALL_ENV
from longvila_jax.data import glyphs
from longvila_jax.data.image import load_image, normalize
from longvila_jax.data.sandbox import DecodeSandbox
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import decode_video, sample_indices, write_video


def upstream_indices(frame_count: int, fps: float, num_frames: int, max_fps: float) -> list[int]:
    """The frames upstream keeps, written out from NVlabs/VILA ``llava/mm_utils.py`` (identical
    on 386d350 and b760c34): ``get_frame_from_vcap`` (max_fps == 0) and
    ``get_frame_from_vcap_with_fps``. Both read the stream once, in order, and keep frame ``i``
    when ``i in frame_indices``, so a repeated index yields its frame once."""
    if max_fps > 0 and frame_count / fps < num_frames / max_fps:
        # _with_fps, "else" branch: frames_required = int(duration * max_fps); 1 -> 2 indices.
        required = int(frame_count / fps * max_fps)
        wanted = np.linspace(0, frame_count - 1, 2 if required == 1 else required, dtype=int)
        return [i for i in range(frame_count) if i in wanted]
    if frame_count >= num_frames:
        wanted = np.linspace(0, frame_count - 1, num_frames, dtype=int)
        return [i for i in range(frame_count) if i in wanted]
    return list(range(frame_count))  # "Left padding frames if the video is not long enough"


@pytest.mark.parametrize(
    ("frame_count", "fps", "num_frames", "max_fps"),
    [
        (100, 25.0, 4, 0.0),
        (48, 8.0, 6, 0.0),  # floor: 0 9 18 28 37 47 (rounding would give 19 and 38)
        (5000, 30.0, 256, 2.0),  # long enough: exactly num_frames
        (40, 8.0, 16, 2.0),  # 5 s < 8 s: int(5 * 2) = 10 frames
        (250, 29.97, 64, 2.0),  # 8.34 s: 16 frames, floor of a non-integer step
        (30, 8.0, 64, 0.0),  # fewer frames than wanted: each frame once, no duplicate
        (10, 1.0, 64, 2.0),  # 10 s at 2 fps asks 20 > 10 frames: each frame once
        (20, 30.0, 8, 2.0),  # int(0.67 * 2) = 1: upstream takes 2 (first and last)
        (12, 2.0, 64, 0.0),  # short, no fps cap
    ],
)
def test_sample_indices_match_upstream(frame_count, fps, num_frames, max_fps):
    got = sample_indices(frame_count, fps, num_frames, max_fps)
    assert got.tolist() == upstream_indices(frame_count, fps, num_frames, max_fps)


def test_short_video_is_read_once_per_frame():
    got = sample_indices(30, 8.0, 64)
    assert got.tolist() == list(range(30))


def test_sample_indices_too_short():
    with pytest.raises(SampleSkipped, match="too_few_frames"):
        sample_indices(1, 8.0, 8, min_frames=2)
    with pytest.raises(SampleSkipped, match="too_few_frames"):  # int(0.1 s * 2) = 0 frames
        sample_indices(3, 30.0, 8, max_fps=2.0)
    with pytest.raises(TypeError):  # the old positional sp_degree fails loudly
        sample_indices(100, 8.0, 8, 0.0, 2)


def _numbered_video(path, n=48, size=64, gop=12, codec="libx264"):
    frames = np.stack([glyphs.render_number(f"{i:02d}", size, (40, 90, 200)) for i in range(n)])
    write_video(path, frames, fps=8, codec=codec, gop=gop)


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_decode_frames_are_the_sampled_ones(tmp_path, codec):
    path = tmp_path / "v.mp4"
    _numbered_video(path, codec=codec)
    seq = decode_video(path, 64, 6, seek_gap_frames=1000)
    seek = decode_video(path, 64, 6, seek_gap_frames=1)
    want = [f"{i:02d}" for i in upstream_indices(48, 8.0, 6, 0.0)]
    assert [glyphs.read_number(f, 2) for f in seq] == want
    np.testing.assert_array_equal(seq, seek)  # frame-exact seeking


def test_decode_resize_and_hints(tmp_path):
    path = tmp_path / "v.mp4"
    _numbered_video(path, n=20)
    out = decode_video(path, 32, 4, frame_count_hint=20, fps_hint=8.0)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    with pytest.raises(SampleSkipped, match="frame_count_mismatch"):
        decode_video(path, 32, 4, frame_count_hint=200)
    # 5e-324 and 1e-300 used to overflow the seek target (seek_gap_frames=1 seeks per frame).
    for bad in (0.0, float("nan"), 5e-324, 1e-300, 1e300):
        with pytest.raises(SampleSkipped, match="bad_fps"):
            decode_video(path, 32, 4, fps_hint=bad, seek_gap_frames=1)


@pytest.mark.parametrize("size", [32, 64])
def test_write_video_is_byte_reproducible(tmp_path, size):
    # At 32 px x264's macroblock-tree made 3 different files in 40 encodes of this clip.
    frames = np.stack([glyphs.render_number(str(i % 10), size, (40, 90, 200)) for i in range(16)])
    runs = set()
    for k in range(25):
        write_video(tmp_path / f"{k}.mp4", frames)
        runs.add((tmp_path / f"{k}.mp4").read_bytes())
    assert len(runs) == 1
    header = runs.pop()[:4096]  # x264's options string, in the first SEI
    assert (b"mbtree=0" in header) == (size < 64) and (b"mbtree=1" in header) == (size >= 64)


def test_normalize_matches_siglip_formula():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    want = (x.astype(np.float64) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(normalize(x), want, atol=1e-6)
    assert normalize(x).dtype == np.float32


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_image_modes(tmp_path, mode):
    rgb = Image.fromarray(glyphs.render_number("5", 32, (200, 40, 40)))
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path)
    else:
        rgb.convert(mode).save(path)
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert glyphs.read_number(out, 1) == "5"
    if mode == "I;16":  # rescaled from 16 bits, not clipped to white
        want = np.asarray(rgb.convert("L"))
        assert np.abs(out[..., 0].astype(int) - want).max() <= 1


def _png_header_only(path, w, h):
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_default_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 40000, 40000)  # 1.6 G pixels > Pillow's default 89 M
    t = time.perf_counter()
    with pytest.raises(SampleSkipped, match="image_too_large"):
        load_image(bomb, 32)
    assert time.perf_counter() - t < 1.0
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the default guard is left on
    ok = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(ok)
    with pytest.raises(SampleSkipped, match="image_too_large"):
        load_image(ok, 32, max_pixels=1000)


def test_corrupt_image(tmp_path):
    p = tmp_path / "c.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(p)
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(SampleSkipped, match="corrupt_image"):
        load_image(p, 32)


@pytest.mark.slow
def test_sandbox_timeout_kills_and_recovers(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    _numbered_video(path, n=12)
    hang = tmp_path / "hang.mp4"
    shutil.copyfile(path, hang)
    monkeypatch.setenv(STALL_ENV, "decode:hang.mp4")  # the child's decoder hangs on this file
    sb = DecodeSandbox(timeout_s=2.0)
    try:
        ref = sb.decode(path=str(path), size=32, num_frames=4)
        pid = sb.pid
        t = time.perf_counter()
        with pytest.raises(SampleSkipped, match="decode_timeout"):
            sb.decode(path=str(hang), size=32, num_frames=4)
        assert 1.9 < time.perf_counter() - t < 4.0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the hung child is gone
        np.testing.assert_array_equal(sb.decode(path=str(path), size=32, num_frames=4), ref)
        with pytest.raises(SampleSkipped, match="missing_file"):
            sb.decode(path=str(tmp_path / "none.mp4"), size=32, num_frames=4)
    finally:
        sb.close()


def test_synthetic_answers_visible(corpus):
    short = json.loads((corpus / "videos_short.json").read_text())
    for rec in short[:3]:
        frames = decode_video(corpus / rec["video"], 32, 4)
        answer = rec["conversations"][1]["value"]
        assert {glyphs.read_number(f, len(answer)) for f in frames} == {answer}
    rec = json.loads((corpus / "needle_eval.jsonl").read_text().splitlines()[0])
    frames = decode_video(corpus / rec["video"], 32, rec["frames"])  # every frame
    answer = rec["conversations"][1]["value"]
    hits = [i for i, f in enumerate(frames) if glyphs.read_number(f, len(answer)) == answer]
    assert hits == [rec["needle_frame"]]  # exactly one needle frame, where the manifest says
    # The haystack is flat colours only: no other frame holds any ink.
    assert all(f.std(axis=(0, 1)).max() < 8 for i, f in enumerate(frames) if i != hits[0])
    train = [json.loads(x) for x in (corpus / "needle_train.jsonl").read_text().splitlines()]
    assert rec["video"] not in {r["video"] for r in train}  # held-out videos


def test_two_digit_needles_hold_out_their_secrets(tmp_path):
    from longvila_jax.data.synthetic import generate

    generate(tmp_path, seed=1, size=32, n_images=1, n_videos=1, n_needles=(12, 3), digits=2)
    secrets = {
        split: {
            json.loads(x)["conversations"][1]["value"]
            for x in (tmp_path / f"needle_{split}.jsonl").read_text().splitlines()
        }
        for split in ("train", "eval")
    }
    assert all(len(s) == 2 for s in secrets["train"] | secrets["eval"])
    assert secrets["eval"] and not secrets["eval"] & secrets["train"]


@pytest.mark.slow
def test_sandbox_child_death_is_a_crash_skip(tmp_path, monkeypatch):
    import signal
    import threading

    path = tmp_path / "v.mp4"
    _numbered_video(path, n=12)
    hang = tmp_path / "hang.mp4"
    shutil.copyfile(path, hang)
    monkeypatch.setenv(STALL_ENV, "decode:hang.mp4")  # the child is busy when it is killed
    sb = DecodeSandbox(timeout_s=20.0)
    try:
        ref = sb.decode(path=str(path), size=32, num_frames=4)
        # Simulates a segfault mid-request: the child dies while the parent waits for it.
        threading.Timer(0.5, os.kill, (sb.pid, signal.SIGKILL)).start()
        t = time.perf_counter()
        with pytest.raises(SampleSkipped, match="decoder_crash.*-9"):
            sb.decode(path=str(hang), size=32, num_frames=4)
        assert time.perf_counter() - t < 10.0
        np.testing.assert_array_equal(sb.decode(path=str(path), size=32, num_frames=4), ref)
    finally:
        sb.close()


def test_video_that_is_a_fifo_is_skipped_without_blocking(tmp_path):
    fifo = tmp_path / "v.mp4"
    os.mkfifo(fifo)
    with time_limit(20), pytest.raises(SampleSkipped, match="not_regular_file"):
        decode_video(fifo, 32, 4)  # in this process: no sandbox to time it out


def test_image_that_is_a_fifo_is_skipped_without_blocking(tmp_path):
    # load_image checks the open descriptor, so a FIFO swapped in after the manifest's path
    # check cannot block Pillow's read.
    fifo = tmp_path / "swap.png"
    os.mkfifo(fifo)
    with pytest.raises(SampleSkipped, match="not_regular_file.*FIFO"):
        load_image(fifo, 32)


def test_short_video_kept_whole_despite_sp_degree(corpus, make_cfg, tmp_path):
    """40 frames at 8 fps (5 s) with num_video_frames 64 and max_fps 2 sample 10 frames; the old
    rounding to a multiple of sp_degree 16 left 0 and skipped the video. Upstream's longvideo_sft
    never rounds (longvila.md 5.4): all 10 frames, in order, one ``<image>`` each."""
    from longvila_jax.data.samples import SampleProcessor
    from longvila_jax.data.text import image_token_id

    _numbered_video(tmp_path / "v.mp4", n=40)
    rec = {
        "video": "v.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nQ?"},
            {"from": "gpt", "value": "A."},
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps([rec]))
    ds = {
        "name": "v",
        "manifest": str(tmp_path / "m.json"),
        "kind": "video",
        "media_root": str(tmp_path),
    }
    cfg = make_cfg(
        corpus,
        datasets=[ds],
        image_size=64,
        num_video_frames=64,
        max_fps=2.0,
        sp_degree=16,
        max_frames_per_row=64,
        max_length=2048,
    )
    proc = SampleProcessor(cfg)
    out = proc({"dataset": "v", "index": 0, "raw": rec})
    assert "skip_reason" not in out, out
    want = [f"{i:02d}" for i in upstream_indices(40, 8.0, 64, 2.0)]
    assert len(want) == 10
    assert [glyphs.read_number(f, 2) for f in out["frames"]] == want
    assert int(np.sum(out["input_ids"] == image_token_id(proc.tokenizer))) == 10
