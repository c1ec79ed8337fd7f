"""Video decoding with PyAV: the LongVILA frame-sampling rule, sequential or seeking decode.

Sampling follows ``llava/mm_utils.py`` (``get_frame_from_vcap`` and
``get_frame_from_vcap_with_fps``, identical on upstream 386d350 and b760c34): the frame indices are
``linspace(0, frame_count - 1, m)`` truncated to integers (numpy ``dtype=int``, i.e. floor), with
``m = num_frames``, unless ``max_fps > 0`` and the video lasts less than ``num_frames / max_fps``
seconds, in which case ``m = int(duration * max_fps)`` (at least 2). Upstream reads the stream once
and keeps a frame when its index is in that list, so an index that repeats (a video with fewer
frames than ``m``) yields its frame once: a short video gives each of its frames once, never a
duplicate. The count is never rounded to a multiple of the sequence-parallel degree: upstream's
``longvideo_sft`` frames are split unevenly over the SP ranks (longvila.md section 5.4).

Decoding is sequential when samples are dense (mean gap <= ``seek_gap_frames``, about one GOP)
and seeks per frame otherwise; frames are converted to RGB and resized (bicubic) by libswscale in
the same call. Every failure raises ``SampleSkipped`` with a reason from ``skips.REASONS``; where
upstream substitutes black frames (an empty or one-frame video) the sample is skipped instead.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from longvila_jax.core import faults
from longvila_jax.core.errors import brief_path
from longvila_jax.data.skips import SampleSkipped


def sample_indices(
    frame_count: int,
    fps: float,
    num_frames: int,
    max_fps: float = 0.0,
    *,
    min_frames: int = 1,
) -> np.ndarray:
    """Frame indices to decode (upstream's training-time rule, see the module docstring).

    Args:
      frame_count: frames in the video.
      fps: frames per second of the video (used only when ``max_fps > 0``).
      num_frames: frames wanted (``num_video_frames``).
      max_fps: upper bound on sampled frames per second; 0 disables it.
      min_frames: fewer sampled frames than this is an error (keyword only: the former
        positional ``sp_degree`` parameter is gone, so an old positional call fails loudly).

    Returns:
      int64 [n] strictly increasing indices in ``[0, frame_count)``; n <= ``num_frames`` (fewer
      when the video has fewer frames, or lasts less than ``num_frames / max_fps`` seconds).

    Raises:
      SampleSkipped: ``too_few_frames`` when the video or the sampled count is too short.
    """
    if frame_count < max(min_frames, 1):
        raise SampleSkipped("too_few_frames", f"{frame_count} frames < min {min_frames}")
    m = num_frames
    if max_fps > 0:
        if not fps > 0:  # upstream: fps 0 is an empty (black) video
            raise SampleSkipped("bad_fps", f"fps {fps}")
        duration = frame_count / fps
        if duration < num_frames / max_fps:  # get_frame_from_vcap_with_fps's short branch
            m = int(duration * max_fps)
            if m == 0:  # upstream: an empty (black) video
                raise SampleSkipped("too_few_frames", f"{duration:.3g} s at max_fps {max_fps}")
            m = max(m, 2)
    # dtype=int truncates, as upstream's np.linspace(..., dtype=int); unique: each frame once.
    idx = np.unique(np.linspace(0, frame_count - 1, m).astype(np.int64))
    if len(idx) < max(min_frames, 1):
        raise SampleSkipped("too_few_frames", f"{len(idx)} sampled frames < min {min_frames}")
    return idx


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SampleSkipped("missing_file", str(path)) from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise SampleSkipped("missing_file", f"{brief_path(path)}: {e}") from None
    if not stat.S_ISREG(st.st_mode):  # FFmpeg would block on a FIFO, even outside the sandbox
        raise SampleSkipped("not_regular_file", f"{path} is not a regular file")
    if st.st_size == 0:
        raise SampleSkipped("empty_file", str(path))


# Frame rates a real video has (time-lapse to high-speed capture); anything else is hostile.
MIN_FPS, MAX_FPS = 1e-3, 1e4


def _probe(container, path: Path, fps_hint: float | None, count_hint: int | None):
    if not container.streams.video:
        raise SampleSkipped("no_video_stream", str(path))
    stream = container.streams.video[0]
    fps = fps_hint if fps_hint is not None else float(stream.average_rate or 0)
    if not math.isfinite(fps) or not MIN_FPS <= fps <= MAX_FPS:
        # 5e-324 or 1e6 from a hostile manifest or container would overflow seek targets.
        raise SampleSkipped("bad_fps", f"{path}: fps {fps} outside [{MIN_FPS}, {MAX_FPS}]")
    count = count_hint if count_hint is not None else int(stream.frames or 0)
    if count <= 0 and stream.duration and stream.time_base:
        count = int(round(float(stream.duration * stream.time_base) * fps))
    if count <= 0:
        # No usable metadata: count packets (demux only, no decoding).
        count = sum(1 for p in container.demux(stream) if p.size)
        container.seek(0, stream=stream)
    if count <= 0:
        raise SampleSkipped("no_frames", f"{path}: the video stream holds no frames")
    return stream, fps, count


class _RGB:
    """Frame -> uint8 [size, size, 3] through one reusable swscale context per video.

    ``VideoFrame.to_ndarray(width=...)`` builds a new scaler for every frame, which costs
    several times the decode itself on small frames; one ``VideoReformatter`` per video gives
    the same pixels.
    """

    def __init__(self, size: int):
        self.size = size
        self.reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        out = self.reformatter.reformat(
            frame, width=self.size, height=self.size, format="rgb24", interpolation="BICUBIC"
        )
        return out.to_ndarray()


def _decode_sequential(container, stream, indices: np.ndarray, size: int, path: Path):
    wanted = {int(j) for j in indices}
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    rgb = _RGB(size)
    decoded = 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                out[i] = rgb(frame)
            if i >= last:
                break
    except av.FFmpegError as e:
        if decoded == 0:
            raise SampleSkipped("no_frames", f"{path}: zero decodable frames ({e})") from None
        raise
    if decoded == 0:
        raise SampleSkipped("no_frames", f"{path}: zero decodable frames")
    if len(out) < len(wanted):
        raise SampleSkipped(
            "frame_count_mismatch",
            f"{path}: stream ended after {decoded} frames, needed {last + 1}",
        )
    return np.stack([out[int(j)] for j in indices])


def _decode_seeking(container, stream, indices: np.ndarray, fps: float, size: int, path: Path):
    start = stream.start_time or 0
    out: dict[int, np.ndarray] = {}
    rgb = _RGB(size)
    for j in np.unique(indices):
        target = start + int(round(int(j) / fps / float(stream.time_base)))
        container.seek(target, stream=stream, backward=True, any_frame=False)
        got = None
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.pts >= target:
                    got = frame
                    break
        except av.FFmpegError as e:
            if not out:
                raise SampleSkipped("no_frames", f"{path}: zero decodable frames ({e})") from None
            raise
        if got is None:
            if not out:
                raise SampleSkipped("no_frames", f"{path}: nothing decodable at frame {j}")
            raise SampleSkipped("frame_count_mismatch", f"{path}: frame {j} not in the stream")
        out[int(j)] = rgb(got)
    return np.stack([out[int(j)] for j in indices])


def decode_frames(
    path: str | os.PathLike,
    size: int,
    pick: Callable[[int, float], np.ndarray],
    *,
    seek_gap_frames: int = 60,
    fps_hint: float | None = None,
    frame_count_hint: int | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Decodes the frames ``pick`` chooses from one video (in this process, no timeout).

    The one open/probe/decode path of training (:func:`decode_video`) and of inference's frame
    rule (``infer.frames``): only the choice of indices differs between them.

    Args:
      path: video file.
      size: output side in pixels.
      pick: ``(frame_count, fps) -> int64 [n]`` non-decreasing indices in ``[0, frame_count)``;
        may raise ``SampleSkipped``.
      seek_gap_frames: seek per frame when the mean index gap exceeds this.
      fps_hint, frame_count_hint: manifest ``fps`` / ``frame_count``, trusted over the container.
      threads: decoder threads (0: FFmpeg's choice, 1: single core).

    Returns:
      uint8 [n, size, size, 3], one row per picked index (repeats kept).

    Raises:
      SampleSkipped: for every kind of bad video.
    """
    path = Path(path)
    _check_file(path)
    faults.stall("decode", str(path))  # tests: a decoder that hangs on this file
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise SampleSkipped("unreadable_video", f"{path}: {type(e).__name__}: {e}") from None
    try:
        stream, fps, count = _probe(container, path, fps_hint, frame_count_hint)
        if threads:
            stream.thread_count = threads
        else:
            stream.thread_type = "AUTO"
        idx = np.asarray(pick(count, fps), np.int64)
        if idx.ndim != 1 or not len(idx) or idx.min() < 0 or idx.max() >= count:
            raise SampleSkipped("no_frames", f"{path}: no frame indices in [0, {count}) to read")
        gap = (idx[-1] - idx[0]) / max(len(idx) - 1, 1)
        if gap > seek_gap_frames:
            return _decode_seeking(container, stream, idx, fps, size, path)
        return _decode_sequential(container, stream, idx, size, path)
    except av.FFmpegError as e:
        raise SampleSkipped("unreadable_video", f"{path}: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def decode_video(
    path: str | os.PathLike,
    size: int,
    num_frames: int,
    max_fps: float = 0.0,
    min_frames: int = 2,
    seek_gap_frames: int = 60,
    fps_hint: float | None = None,
    frame_count_hint: int | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Samples (training rule, :func:`sample_indices`) and decodes frames of one video.

    Args:
      path: video file.
      size: output side in pixels.
      num_frames, max_fps, min_frames: see ``sample_indices``.
      seek_gap_frames, fps_hint, frame_count_hint, threads: see :func:`decode_frames`.

    Returns:
      uint8 [n, size, size, 3], n as ``sample_indices`` gives it.

    Raises:
      SampleSkipped: for every kind of bad video.
    """
    return decode_frames(
        path,
        size,
        lambda count, fps: sample_indices(count, fps, num_frames, max_fps, min_frames=min_frames),
        seek_gap_frames=seek_gap_frames,
        fps_hint=fps_hint,
        frame_count_hint=frame_count_hint,
        threads=threads,
    )


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str = "libx264", gop: int = 16
) -> None:
    """Encodes uint8 [n, H, W, 3] RGB frames (H, W even) to an mp4 (synthetic data and tests).

    The bytes are a function of the frames and the arguments: one encoder thread (x264's frame
    threads depend on scheduling), and x264's macroblock-tree rate control off for frames under
    64 px, where it made the output vary from run to run (3 different files in 40 encodes of
    one 32x32 clip; none at 48, 64 or 128 px, and none at 32 px with ``mbtree=0``). Frames of
    64 px and more (the demo's) keep it, so their bytes do not change.
    """
    n, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.gop_size = gop
        s.codec_context.thread_count = 1
        if codec == "libx264":
            opts = {"crf": "12", "g": str(gop), "preset": "veryfast", "threads": "1"}
            s.options = {**opts, "x264-params": "mbtree=0"} if min(h, w) < 64 else opts
        else:  # mpeg4's default bit rate blurs small synthetic glyphs
            s.bit_rate = 4_000_000
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


__all__ = ["decode_frames", "decode_video", "sample_indices", "write_video"]
