"""Clips of long videos (``data.clips``): cutting by timestamps, frame indices inside a range,
the killable reader's probe and decode, timestamps and the writer's clip lines."""

from __future__ import annotations

import numpy as np
import pytest

from longvila_jax.data.clips import (
    CLIP_LINE_RE,
    Clip,
    ClipReader,
    VideoInfo,
    clip_indices,
    clip_line,
    decode_clip,
    format_timestamp,
    parse_timestamp,
    probe_video,
    split_clips,
)
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import write_video


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """50 frames at 2 fps (25 s); frame i is flat grey level 5 * i."""
    path = tmp_path_factory.mktemp("clips") / "ramp.mp4"
    frames = np.repeat(np.arange(0, 250, 5, dtype=np.uint8), 32 * 32 * 3).reshape(50, 32, 32, 3)
    write_video(path, frames, fps=2)
    return path


def test_split_clips_tiles_the_video_and_merges_a_short_tail():
    assert split_clips(VideoInfo(25.0, 2.0, 50), 10.0, 2.0) == [
        Clip(0, 0.0, 10.0),
        Clip(1, 10.0, 20.0),
        Clip(2, 20.0, 25.0),
    ]
    # A 1 s tail joins the clip before it.
    assert split_clips(VideoInfo(21.0, 1.0, 21), 10.0, 2.0) == [
        Clip(0, 0.0, 10.0),
        Clip(1, 10.0, 21.0),
    ]
    assert split_clips(VideoInfo(30.0, 1.0, 30), 10.0) == [
        Clip(0, 0.0, 10.0),
        Clip(1, 10.0, 20.0),
        Clip(2, 20.0, 30.0),
    ]
    assert split_clips(VideoInfo(1.0, 1.0, 1), 10.0, 2.0) == []
    with pytest.raises(ValueError, match="clip length"):
        split_clips(VideoInfo(30.0, 1.0, 30), 0.0)


def test_clip_indices_stay_inside_the_range():
    # 2 fps: [10 s, 20 s) holds frames 20..39.
    assert clip_indices(2.0, 50, 10.0, 20.0, 4).tolist() == [20, 26, 32, 39]
    assert clip_indices(2.0, 50, 10.0, 20.0, 100).tolist() == list(range(20, 40))
    # A range running past the end stops at the last frame; a fractional start rounds up.
    assert clip_indices(2.0, 50, 20.2, 30.0, 2).tolist() == [41, 49]
    with pytest.raises(SampleSkipped, match="too_few_frames"):
        clip_indices(2.0, 50, 30.0, 40.0, 4)
    with pytest.raises(SampleSkipped, match="bad_fps"):
        clip_indices(0.0, 50, 0.0, 10.0, 4)


def test_reader_probes_and_decodes_the_clip_frames(ramp):
    reader = ClipReader(60.0)
    try:
        assert reader.probe(ramp) == VideoInfo(25.0, 2.0, 50)
        frames = reader.frames(ramp, 32, 10.0, 20.0, 4)
        assert frames.shape == (4, 32, 32, 3)
        # Frames 20, 26, 32, 39 show grey 100, 130, 160, 195 (within codec error).
        np.testing.assert_allclose(frames[:, 16, 16, 0], [100, 130, 160, 195], atol=4)
        np.testing.assert_array_equal(frames, decode_clip(ramp, 32, 10.0, 20.0, 4))
        with pytest.raises(SampleSkipped, match="too_few_frames"):
            reader.frames(ramp, 32, 30.0, 40.0, 4)
        bad = ramp.parent / "bad.mp4"
        bad.write_bytes(b"\x00junk" * 100)
        with pytest.raises(SampleSkipped, match="unreadable_video"):
            reader.probe(bad)
        assert reader.probe(ramp).frame_count == 50  # the child survives a bad video
    finally:
        reader.close()
    assert probe_video(ramp) == VideoInfo(25.0, 2.0, 50)


def test_timestamps_and_clip_lines():
    assert format_timestamp(0) == "00:00"
    assert format_timestamp(59.9) == "00:59"
    assert format_timestamp(610) == "10:10"
    assert format_timestamp(3725.5) == "1:02:05"
    assert parse_timestamp("10:10") == 610.0
    assert parse_timestamp("1:02:05") == 3725.0
    for bad in ("1:2", "10:61", "abc", "1:60:00", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)
    line = clip_line(3, 30.0, 40.0, "a red\nscene [x]")
    assert line == "[clip 3 | 00:30-00:40] a red scene [x]"
    assert CLIP_LINE_RE.match(line).groups() == ("3", "00:30", "00:40", "a red scene [x]")
