"""Clips of long videos: probing, cutting by timestamps, sampling frames inside a time range.

The long-video data engine (``longvideo/``) cuts every video into clips of a fixed length by
timestamps alone: nothing is re-encoded, a clip is a (start, end) range of its video, and its
frames are decoded from the original file when a captioner needs them. Frame ``i`` of a video
shows time ``i / fps``; the frames of a clip are those whose times fall in ``[start, end)``.

Videos are hostile input, so :class:`ClipReader` probes and decodes in ``data.sandbox``'s killable
child (``python -m longvila_jax.data.clip_child``), with a timeout per request. The sandbox
protocol carries uint8 arrays, so a probe's answer travels as the UTF-8 bytes of its JSON.

Timestamps are written ``MM:SS`` (``H:MM:SS`` from one hour on) in prompts and answers;
:data:`CLIP_LINE_RE` is the one line format that hands a clip's caption to the writer LLM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from longvila_jax.data.sandbox import DecodeSandbox
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import decode_frames

CHILD_MODULE = "longvila_jax.data.clip_child"
_TS = r"(?:\d+:)?\d{1,2}:\d{2}"
# One clip line of the writer's prompt: ``[clip 3 | 00:30-00:40] caption``.
CLIP_LINE_RE = re.compile(rf"^\[clip (\d+) \| ({_TS})-({_TS})\] (.*)$")
TIMESTAMP_RE = re.compile(rf"(?<![\d:])({_TS})(?![\d:])")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a probe finds: ``frame_count`` frames at ``fps``, lasting ``duration_s``."""

    duration_s: float
    fps: float
    frame_count: int


@dataclasses.dataclass(frozen=True)
class Clip:
    """Clip ``index`` of a video: the range ``[start_s, end_s)`` seconds."""

    index: int
    start_s: float
    end_s: float


def split_clips(info: VideoInfo, clip_s: float = 10.0, min_clip_s: float = 2.0) -> list[Clip]:
    """Cuts a video into consecutive clips of ``clip_s`` seconds.

    The last clip keeps what is left; a rest shorter than ``min_clip_s`` joins the clip before
    it (a 1 s tail is too short to caption on its own). A video shorter than ``min_clip_s``
    gives no clip.

    Returns:
      the clips in order, tiling ``[0, info.duration_s)``.
    """
    if not clip_s > 0 or not min_clip_s >= 0:
        raise ValueError(f"clip length {clip_s} and minimum {min_clip_s} must be positive")
    duration = info.duration_s
    if duration < max(min_clip_s, 1e-9):
        return []
    bounds = [k * clip_s for k in range(int(math.ceil(duration / clip_s)))] + [duration]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_clip_s:
        del bounds[-2]
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    return [Clip(k, float(a), float(b)) for k, (a, b) in enumerate(pairs)]


def clip_indices(
    fps: float, frame_count: int, start_s: float, end_s: float, num_frames: int
) -> np.ndarray:
    """Frame indices spread uniformly over a time range.

    Args:
      fps, frame_count: the video's (frame ``i`` shows time ``i / fps``).
      start_s, end_s: the range ``[start_s, end_s)``.
      num_frames: frames wanted (>= 1).

    Returns:
      int64 [n] strictly increasing indices, n <= ``num_frames`` (fewer when the range holds
      fewer frames): ``linspace(first, last, num_frames)`` truncated, duplicates removed.

    Raises:
      SampleSkipped: ``too_few_frames`` when the range holds no frame; ``bad_fps``.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise SampleSkipped("bad_fps", f"fps {fps}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    first = max(int(math.ceil(start_s * fps - 1e-9)), 0)
    stop = min(int(math.ceil(end_s * fps - 1e-9)), frame_count)
    if stop <= first:
        raise SampleSkipped(
            "too_few_frames", f"no frame in [{start_s:g} s, {end_s:g} s) at {fps:g} fps"
        )
    return np.unique(np.linspace(first, stop - 1, num_frames).astype(np.int64))


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Opens a video in this process and reads its fps and frame count (decoding its first
    frame, so a video whose stream cannot be decoded fails here). Raises ``SampleSkipped``."""
    seen: dict[str, float] = {}

    def first(count: int, fps: float) -> np.ndarray:
        seen.update(count=count, fps=fps)
        return np.zeros(1, np.int64)

    decode_frames(path, 16, first, threads=1)
    count, fps = int(seen["count"]), float(seen["fps"])
    return VideoInfo(duration_s=count / fps, fps=fps, frame_count=count)


def decode_clip(
    path: str | os.PathLike, size: int, start_s: float, end_s: float, num_frames: int
) -> np.ndarray:
    """Decodes ``num_frames`` frames spread over ``[start_s, end_s)`` (in this process).

    Returns:
      uint8 [n, size, size, 3], n as :func:`clip_indices` gives it.

    Raises:
      SampleSkipped: for every kind of bad video or an empty range.
    """
    return decode_frames(
        path,
        size,
        lambda count, fps: clip_indices(fps, count, start_s, end_s, num_frames),
        threads=1,
    )


def child_request(op: str, path: str, **kwargs) -> np.ndarray:
    """The clip child's entry (``data.clip_child``): ``probe`` -> the JSON of a
    :class:`VideoInfo` as uint8 bytes; ``clip`` -> :func:`decode_clip`'s frames."""
    if op == "probe":
        info = dataclasses.asdict(probe_video(path))
        return np.frombuffer(json.dumps(info).encode(), np.uint8)
    if op == "clip":
        return decode_clip(path, **kwargs)
    raise ValueError(f"unknown clip request {op!r}")


class ClipReader:
    """Probes and decodes clips in a killable child process (module docstring).

    Args:
      timeout_s: seconds one probe or decode may take before the child is killed and the video
        skipped as ``decode_timeout``.
    """

    def __init__(self, timeout_s: float = 60.0):
        self.sandbox = DecodeSandbox(timeout_s, module=CHILD_MODULE)

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        """The video's :class:`VideoInfo`. Raises ``SampleSkipped``."""
        raw = self.sandbox.decode(op="probe", path=str(Path(path)))
        info = json.loads(raw.tobytes())
        return VideoInfo(float(info["duration_s"]), float(info["fps"]), int(info["frame_count"]))

    def frames(
        self, path: str | os.PathLike, size: int, start_s: float, end_s: float, num_frames: int
    ) -> np.ndarray:
        """uint8 [n, size, size, 3] frames of ``[start_s, end_s)`` (:func:`decode_clip`)."""
        return self.sandbox.decode(
            op="clip",
            path=str(Path(path)),
            size=int(size),
            start_s=float(start_s),
            end_s=float(end_s),
            num_frames=int(num_frames),
        )

    def close(self) -> None:
        self.sandbox.close()


def format_timestamp(seconds: float) -> str:
    """``MM:SS`` below one hour, ``H:MM:SS`` from one hour on (seconds floored)."""
    s = max(int(math.floor(seconds + 1e-9)), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def parse_timestamp(text: str) -> float:
    """Seconds of an ``MM:SS`` or ``H:MM:SS`` timestamp. Raises ValueError otherwise."""
    if not re.fullmatch(_TS, text.strip(), re.ASCII):
        raise ValueError(f"not a timestamp (MM:SS or H:MM:SS): {text!r}")
    parts = [int(p) for p in text.strip().split(":")]
    if any(p >= 60 for p in parts[1:]) or (len(parts) == 3 and parts[1] >= 60):
        raise ValueError(f"minutes and seconds must be below 60: {text!r}")
    h, m, s = [0] * (3 - len(parts)) + parts
    return float(3600 * h + 60 * m + s)


def clip_line(index: int, start_s: float, end_s: float, caption: str) -> str:
    """One clip line of the writer's prompt (:data:`CLIP_LINE_RE`); the caption's own line
    breaks become spaces so that one line stays one clip."""
    text = " ".join(caption.split())
    return f"[clip {index} | {format_timestamp(start_s)}-{format_timestamp(end_s)}] {text}"


__all__ = [
    "CLIP_LINE_RE",
    "TIMESTAMP_RE",
    "Clip",
    "ClipReader",
    "VideoInfo",
    "clip_indices",
    "clip_line",
    "decode_clip",
    "format_timestamp",
    "parse_timestamp",
    "probe_video",
    "split_clips",
]
