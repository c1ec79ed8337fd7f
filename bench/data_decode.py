"""Decode benchmark: 256 uniformly sampled frames of a long 448p video, PyAV vs OpenCV seeking.

Measures decoded + preprocessed (384 px bicubic resize, SigLIP normalisation to float32) frames
per second on one core for

- ``pyav``: ``longvila_jax.data.video.decode_video`` (sequential decode when samples are dense,
  one decoder thread) followed by ``image.normalize``;
- ``opencv_seek``: the PyTorch original's loader (``llava/mm_utils.py::opencv_extract_frames``):
  ``CAP_PROP_POS_FRAMES`` seek + ``read()`` per sampled frame, BGR -> RGB, then the same resize and
  normalisation (``cv2.resize`` bicubic).

Both must return the same frame indices (each frame shows its index as digits, read back from
the output). Usage::

    .venv/bin/python bench/data_decode.py [--frames 1800] [--samples 256] [--repeats 3]

Needs ``opencv-python-headless`` in the venv (benchmark only; the library never imports cv2).
Prints a table and writes ``bench/results/data_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from longvila_jax.data.glyphs import read_number, render_number
from longvila_jax.data.image import normalize
from longvila_jax.data.video import decode_video, sample_indices, write_video

SIZE_IN, SIZE_OUT, FPS, GOP = 448, 384, 30, 60


def make_video(path: Path, n: int) -> None:
    """n frames of 448x448: a moving smooth pattern with the frame index drawn as 4 digits."""
    yy, xx = np.mgrid[0:SIZE_IN, 0:SIZE_IN].astype(np.float32)
    frames = np.empty((n, SIZE_IN, SIZE_IN, 3), np.uint8)
    for i in range(n):
        img = render_number(f"{i:04d}", SIZE_IN, (0, 0, 0), ink=(255, 255, 255)).astype(np.float32)
        wave = 60 + 50 * np.sin((xx + 3 * i) / 23.0) * np.cos((yy - 2 * i) / 31.0)
        bg = img.sum(-1, keepdims=True) == 0
        img = np.where(bg, np.stack([wave, wave * 0.7, 120 - wave * 0.5], -1), img)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    write_video(path, frames, fps=FPS, gop=GOP)


def load_pyav(path: Path, n: int) -> np.ndarray:
    frames = decode_video(path, SIZE_OUT, n, min_frames=1, threads=1)
    return normalize(frames)


def load_opencv_seek(path: Path, n: int) -> np.ndarray:
    import cv2

    cv2.setNumThreads(1)
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    out = []
    for i in sample_indices(count, FPS, n, min_frames=1):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, bgr = cap.read()
        if not ok:
            raise RuntimeError(f"opencv could not read frame {i}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        out.append(cv2.resize(rgb, (SIZE_OUT, SIZE_OUT), interpolation=cv2.INTER_CUBIC))
    cap.release()
    return normalize(np.stack(out))


def _indices_shown(frames: np.ndarray) -> list[int]:
    u8 = np.clip(np.rint((frames * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
    return [int(s) if s.isdigit() else -1 for s in (read_number(f, 4, tol=100) for f in u8)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1800, help="video length (30 fps)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--video", type=Path, help="reuse this video instead of generating one")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/data_decode.json")
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    video = a.video or Path(tmp.name) / "long_448p.mp4"
    if not video.exists():
        t = time.perf_counter()
        make_video(video, a.frames)
        print(f"wrote {video} ({a.frames} frames) in {time.perf_counter() - t:.1f} s")
    want = sample_indices(a.frames, FPS, a.samples, min_frames=1).tolist()
    results = {}
    for name, fn in (("pyav", load_pyav), ("opencv_seek", load_opencv_seek)):
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            frames = fn(video, a.samples)
            times.append(time.perf_counter() - t)
        shown = _indices_shown(frames)
        results[name] = {
            "best_s": min(times),
            "median_s": float(np.median(times)),
            "frames_per_s_per_core": a.samples / min(times),
            "shape": list(frames.shape),
            "dtype": str(frames.dtype),
            "indices_correct": shown == want,
        }
    speedup = results["opencv_seek"]["best_s"] / results["pyav"]["best_s"]
    report = {
        "video": {"frames": a.frames, "fps": FPS, "size": SIZE_IN, "codec": "libx264", "gop": GOP},
        "samples": a.samples,
        "output_size": SIZE_OUT,
        "threads": 1,
        "repeats": a.repeats,
        "results": results,
        "speedup_pyav_vs_opencv": speedup,
        "host": {
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_avg_1m": os.getloadavg()[0],
        },
    }
    print(f"{'loader':<14}{'best s':>9}{'median s':>10}{'frames/s/core':>15}{'indices ok':>12}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['best_s']:>9.3f}{r['median_s']:>10.3f}"
            f"{r['frames_per_s_per_core']:>15.1f}{str(r['indices_correct']):>12}"
        )
    print(f"speedup pyav / opencv_seek: {speedup:.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
