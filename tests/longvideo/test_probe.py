"""The engine's first stage (``longvideo.probe``) on a hostile videos folder: links out of it,
FIFOs and dangling links are passed over and counted, never opened; an unreadable, too-short or
swapped-for-a-FIFO video is journaled as a skip with its reason, and the run goes on."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import InputError
from longvila_jax.data.clips import ClipReader
from longvila_jax.data.video import write_video
from longvila_jax.longvideo.probe import ClipSettings, clips_of, find_videos, run_probe
from longvila_jax.longvideo.store import Journal


def _video(path, seconds: int, fps: int = 2):
    frames = np.repeat(np.arange(seconds * fps, dtype=np.uint8) * 3, 16 * 16 * 3)
    write_video(path, frames.reshape(-1, 16, 16, 3), fps=fps)


@pytest.fixture
def hostile(tmp_path):
    root, outside = tmp_path / "videos", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    _video(root / "long.mp4", 30)
    _video(root / "sub" / "short.MKV", 5)
    _video(outside / "secret.mp4", 30)
    (root / "notes.txt").write_text("not a video")
    (root / "junk.mp4").write_bytes(b"\x00junk" * 100)
    os.mkfifo(root / "pipe.mp4")
    (root / "inside_link.mp4").symlink_to(root / "long.mp4")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "dangling.mp4").symlink_to(root / "gone.mp4")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    return root


def test_find_videos_passes_over_links_out_and_special_files(hostile):
    with time_limit(20):
        found, passed = find_videos(hostile)
    assert found == ["inside_link.mp4", "junk.mp4", "long.mp4", "sub/short.MKV"]
    assert passed == {"link_outside_root": 1, "not_regular_file": 2}  # escape; pipe, dangling
    with pytest.raises(InputError, match="not a folder of videos"):
        find_videos(hostile / "long.mp4")


def test_probe_journals_skips_with_reasons_and_goes_on(hostile, tmp_path):
    found, _ = find_videos(hostile)
    os.unlink(hostile / "long.mp4")  # swapped for a FIFO after the listing: must not hang
    os.mkfifo(hostile / "long.mp4")
    journal = Journal(tmp_path / "work" / "probe.jsonl")
    reader = ClipReader(timeout_s=10.0)
    try:
        with time_limit(60):
            run_probe(hostile, found, journal, ClipSettings(), reader, progress=False)
    finally:
        reader.close()
    rec = {k: journal.get(k) for k in found}
    assert {k: r["status"] for k, r in rec.items()} == {
        "inside_link.mp4": "skipped",  # its target is now the FIFO
        "junk.mp4": "skipped",
        "long.mp4": "skipped",
        "sub/short.MKV": "skipped",
    }
    assert rec["junk.mp4"]["reason"] == "unreadable_video"
    assert rec["long.mp4"]["reason"] == rec["inside_link.mp4"]["reason"] == "not_regular_file"
    assert rec["sub/short.MKV"]["reason"] == "too_short"
    assert "5 s < 20 s" in rec["sub/short.MKV"]["detail"]


def test_probe_cuts_a_good_video_and_a_rerun_probes_nothing(hostile, tmp_path):
    journal = Journal(tmp_path / "work" / "probe.jsonl")
    reader = ClipReader(timeout_s=30.0)
    try:
        run_probe(hostile, ["long.mp4"], journal, ClipSettings(clip_s=10.0), reader, False)
        assert [(c.start_s, c.end_s) for c in clips_of(journal.get("long.mp4"))] == [
            (0.0, 10.0),
            (10.0, 20.0),
            (20.0, 30.0),
        ]
        size = journal.path.stat().st_size
        run_probe(hostile, ["long.mp4"], Journal(journal.path), ClipSettings(), reader, False)
        assert journal.path.stat().st_size == size
    finally:
        reader.close()
