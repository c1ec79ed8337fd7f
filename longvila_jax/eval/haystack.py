"""The V-NIAH haystack and where a needle goes in it (longvila.md §8, steps 1 and 2).

- Haystack: the video decoded at 1 frame per second (every ``round(avg_fps)``-th frame, from
  frame 0, as upstream ``llava/eval/vision_niah_vila``), the first n such frames; each frame
  resized to the tower's square, or with ``pad`` letterboxed first as upstream
  (``eval.letterbox``).
- Needle: inserted before haystack frame ``int(depth * n)``, so a prompt holds n + 1 frames.
  The frames are never copied: every frame slot of an expanded prompt points at a row of one
  visual-token table (haystack frames first, then the needles), see :func:`cell_visual_index`.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from longvila_jax.eval.letterbox import pad_and_resize


def one_fps_indices(frame_count: int, avg_fps: float, max_frames: int) -> np.ndarray:
    """Frame indices of the 1 fps haystack: every ``round(avg_fps)``-th frame from 0.

    Args:
      frame_count: frames in the video.
      avg_fps: the stream's average frame rate (Python ``round``, as upstream).
      max_frames: at most this many indices.

    Returns:
      int64 [min(max_frames, ceil(frame_count / step))].
    """
    if avg_fps <= 0 or not np.isfinite(avg_fps):
        raise ValueError(f"haystack: average fps must be positive, got {avg_fps}")
    step = max(1, round(avg_fps))
    return np.arange(0, frame_count, step, dtype=np.int64)[:max_frames]


def load_haystack(path: str | Path, max_frames: int, size: int, pad: bool = False) -> np.ndarray:
    """Decodes the first ``max_frames`` 1 fps frames of a video (sequential decode).

    ``pad``: letterbox each frame at its own resolution onto a mean-colour square before the
    bicubic resize (upstream's ``image_aspect_ratio="pad"``); otherwise libswscale resizes it
    straight to the square while converting to RGB.

    Returns:
      uint8 [max_frames, size, size, 3].

    Raises:
      ValueError: unreadable video or fewer than ``max_frames`` frames at 1 fps.
    """
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"haystack {path}: cannot open ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"haystack {path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or 0)
        step = max(1, round(fps)) if fps > 0 else 1
        # Unknown length: ask for max_frames indices and find out while decoding.
        count = int(stream.frames or 0) or max_frames * step
        keep = set(one_fps_indices(count, fps, max_frames).tolist())
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                if pad:
                    rgb = pad_and_resize(frame.to_ndarray(format="rgb24"), size)
                else:
                    rgb = frame.to_ndarray(
                        width=size, height=size, format="rgb24", interpolation="BICUBIC"
                    )
                frames.append(rgb)
                if len(frames) == max_frames:
                    break
    if len(frames) < max_frames:
        raise ValueError(
            f"haystack {path}: only {len(frames)} frames at 1 fps ({fps:.3g} fps video), "
            f"{max_frames} needed for the largest frame count"
        )
    return np.stack(frames)


def insert_position(n_frames: int, depth: float) -> int:
    """Index of the needle among the n + 1 frames: ``int(depth * n_frames)`` (as upstream)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    return int(depth * n_frames)


def frame_sources(n_frames: int, depth: float, needle_row: int) -> np.ndarray:
    """Table row of each of the n + 1 frame slots: haystack 0..n-1 with the needle inserted.

    Returns:
      int64 [n_frames + 1]: ``needle_row`` at ``insert_position``, haystack indices elsewhere.
    """
    at = insert_position(n_frames, depth)
    haystack = np.arange(n_frames, dtype=np.int64)
    return np.concatenate([haystack[:at], [needle_row], haystack[at:]])


def cell_visual_index(
    visual_index: np.ndarray, n_frames: int, depth: float, needle_row: int, tokens_per_frame: int
) -> np.ndarray:
    """Points the n + 1 frame slots of an expanded prompt at the haystack/needle table rows.

    Args:
      visual_index: [T] from ``expand_prompts`` for n + 1 placeholders (slot s, token o is
        ``s * tokens_per_frame + o``; -1 for text).
      n_frames: haystack frames n.
      depth: needle depth.
      needle_row: frame row of the needle in the visual-token table.
      tokens_per_frame: visual tokens per frame.

    Returns:
      int32 [T]: ``frame_sources(...)[s] * tokens_per_frame + o`` at visual positions, -1 else.
    """
    slot, offset = visual_index // tokens_per_frame, visual_index % tokens_per_frame
    sources = frame_sources(n_frames, depth, needle_row)
    rows = sources[np.maximum(slot, 0)] * tokens_per_frame + offset  # text positions: dropped
    return np.where(visual_index >= 0, rows, -1).astype(np.int32)


__all__ = [
    "cell_visual_index",
    "frame_sources",
    "insert_position",
    "load_haystack",
    "one_fps_indices",
]
