"""Stage 1 of the data engine: find the videos, probe each, cut it into clips by timestamps.

Videos are the files under ``VIDEOS_DIR`` (recursively, in sorted order) whose suffix is a
video container's. Links are followed only when they stay inside the folder; FIFOs, devices and
other special files are skipped, never opened (reading one could hang). Each video is probed in
the clip reader's killable child (``data.clips.ClipReader``): its fps and frame count give its
duration, and ``data.clips.split_clips`` cuts it into clips. A video that cannot be read, or is
shorter than ``min_video_s``, is journaled as skipped with its reason, so a rerun does not
probe it again; the summary counts the skips per reason.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

from tqdm import tqdm

from longvila_jax.core.errors import InputError, brief_path
from longvila_jax.core.safe_paths import target_allowed
from longvila_jax.data.clips import Clip, ClipReader, VideoInfo, split_clips
from longvila_jax.data.skips import SampleSkipped, bound
from longvila_jax.longvideo.store import Journal

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"})


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """How videos are cut: clips of ``clip_s`` seconds, a tail under ``min_clip_s`` joins the
    clip before it, videos under ``min_video_s`` are skipped as ``too_short``."""

    clip_s: float = 10.0
    min_clip_s: float = 2.0
    min_video_s: float = 20.0

    def __post_init__(self):
        if not (self.clip_s > 0 and 0 <= self.min_clip_s <= self.clip_s):
            raise InputError(
                f"--clip-seconds {self.clip_s} must be > 0 and >= --min-clip-seconds "
                f"{self.min_clip_s} >= 0"
            )
        if not self.min_video_s >= 0:
            raise InputError(f"--min-video-seconds {self.min_video_s} must be >= 0")


def find_videos(root: Path) -> tuple[list[str], collections.Counter]:
    """The videos under ``root`` as sorted POSIX paths relative to it, and the files passed
    over, counted per reason (``not_regular_file``, ``link_outside_root``).

    Raises:
      InputError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise InputError(f"{brief_path(root)} is not a folder of videos")
    found, passed = [], collections.Counter()
    real_root = Path(os.path.realpath(root))
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                continue
            if path.is_symlink() and not target_allowed(path, real_root):
                passed["link_outside_root"] += 1
                continue
            if not path.is_file():  # FIFOs, sockets, devices, dangling links
                passed["not_regular_file"] += 1
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found), passed


def clips_of(record: dict) -> list[Clip]:
    """The clips of a probed video's journal record."""
    return [Clip(k, float(a), float(b)) for k, (a, b) in enumerate(record["clips"])]


def info_of(record: dict) -> VideoInfo:
    i = record["info"]
    return VideoInfo(float(i["duration_s"]), float(i["fps"]), int(i["frame_count"]))


def run_probe(
    root: Path,
    videos: list[str],
    journal: Journal,
    settings: ClipSettings,
    reader: ClipReader,
    progress: bool = True,
) -> None:
    """Probes every video not yet in ``journal`` and journals its clips or its skip."""
    todo = [v for v in videos if v not in journal]
    for rel in tqdm(todo, desc="probe", unit="video", disable=not progress):
        try:
            info = reader.probe(root / rel)
        except SampleSkipped as e:
            journal.add({"key": rel, "status": "skipped", "reason": e.reason, "detail": e.detail})
            continue
        if info.duration_s < settings.min_video_s:
            journal.add(
                {
                    "key": rel,
                    "status": "skipped",
                    "reason": "too_short",
                    "detail": bound(f"{info.duration_s:.3g} s < {settings.min_video_s:g} s"),
                }
            )
            continue
        clips = split_clips(info, settings.clip_s, settings.min_clip_s)
        journal.add(
            {
                "key": rel,
                "status": "ok",
                "info": dataclasses.asdict(info),
                "clips": [[c.start_s, c.end_s] for c in clips],
            }
        )


__all__ = ["VIDEO_SUFFIXES", "ClipSettings", "clips_of", "find_videos", "info_of", "run_probe"]
