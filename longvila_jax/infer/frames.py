"""Which frames of a video inference reads: upstream's inference rule beside the training rule.

Upstream inference (``llava/utils/media.py::_load_video`` on VILA main) reads the model
config's ``num_video_frames`` and ``fps``:

- ``fps > 0``: timestamps ``0, 1/fps, 2/fps, ...`` below the video's duration, the first
  ``num_frames`` of them, each mapped to frame ``int(t * video_fps)``: the first
  ``num_frames / fps`` seconds of the video, one frame every ``1/fps`` seconds;
- ``fps == 0``: ``num_frames`` indices ``round(linspace(0, frame_count - 1, num_frames))``,
  uniform over the whole video.

Training (``data.video.sample_indices``) instead spreads the frames over the whole video and
only lowers the count for short videos. Which rule a request uses is decided by the checkpoint:
an upstream release (it carries a top-level config, ``infer.release``) gets the inference rule
with its config's ``fps``; a checkpoint this project trained gets the training rule it saw.
"""

from __future__ import annotations

import os

import numpy as np

from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import decode_frames


def inference_frame_indices(
    frame_count: int, video_fps: float, num_frames: int, fps: float
) -> np.ndarray:
    """Upstream's inference frame indices (module docstring).

    Args:
      frame_count: frames in the video (>= 1).
      video_fps: the video's frame rate (read only when ``fps > 0``).
      num_frames: the model's ``num_video_frames`` (>= 1).
      fps: the model's ``fps``; 0 = uniform over the whole video.

    Returns:
      int64 [n] indices in ``[0, frame_count)``, n = ``num_frames`` with ``fps == 0``,
      ``min(num_frames, ceil(duration * fps))`` otherwise (repeats kept, as upstream).

    Raises:
      ValueError: a non-positive count, or ``fps > 0`` with a non-positive ``video_fps``.
    """
    if frame_count < 1 or num_frames < 1:
        raise ValueError(f"frame_count {frame_count} and num_frames {num_frames} must be >= 1")
    if fps < 0:
        raise ValueError(f"fps must be >= 0, got {fps}")
    if fps == 0:
        return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(np.int64)
    if not video_fps > 0:
        raise ValueError(f"video fps must be positive for fps sampling, got {video_fps}")
    duration = frame_count / video_fps
    timestamps = np.arange(0, duration, 1.0 / fps)[:num_frames]
    return np.asarray([int(t * video_fps) for t in timestamps], np.int64)


def decode_inference_frames(
    path: str | os.PathLike, size: int, num_frames: int, fps: float, seek_gap_frames: int = 60
) -> np.ndarray:
    """Decodes the frames :func:`inference_frame_indices` picks, resized as in training.

    Returns:
      uint8 [n, size, size, 3].

    Raises:
      SampleSkipped: a missing, unreadable or empty video (the reason names it).
    """

    def pick(count: int, video_fps: float) -> np.ndarray:
        try:
            return inference_frame_indices(count, video_fps, num_frames, fps)
        except ValueError as e:  # a stream without a usable frame rate
            raise SampleSkipped("unreadable_video", f"{path}: {e}") from None

    # The training decoder's open, probe and decode path; only the indices differ.
    return decode_frames(path, size, pick, seek_gap_frames=seek_gap_frames)


__all__ = ["decode_inference_frames", "inference_frame_indices"]
