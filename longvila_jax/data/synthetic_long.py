"""Long synthetic videos with known content per scene, readable back from the pixels.

``generate_long`` writes ``longvideos/long_XXXX.mp4`` (a minute or more at 2 fps) and, next to
each, ``long_XXXX.truth.json``: the ground truth the oracle backends (``backends.oracle``) and
the tests of the long-video data engine check against::

  {"version": 1, "fps": 2, "frame_count": N, "size": 64, "duration_s": N / 2,
   "scenes": [{"index": 0, "start_s": 0.0, "end_s": 20.0, "colour": "red", "number": "7",
               "shapes": 3, "direction": "right"}, ...]}

Scenes last 10 or 20 s, so every boundary falls on a multiple of 10 s (the default clip
length). A scene is a flat background colour (``glyphs.COLOURS`` but gray; the next scene has
another colour and number), one black digit (``glyphs.render_number``) and 1-3 white squares
in the strip below it moving together left or right. A short black bar trails the squares (a
"speed line"), so even one frame shows the direction: a caption read from one frame per scene
is still exact.

Frame ``i`` shows time ``i / fps`` and belongs to the scene whose ``[start_s, end_s)`` holds
it: the same rule as ``data.clips.clip_indices`` and :func:`scenes_in_range`.

:func:`caption_for_scenes` gives the canonical caption ("A red scene shows the number 7 while
3 white squares move right.", scenes joined by " Then a/an ..."), :func:`parse_caption` inverts it
exactly, and :func:`read_scene` / :func:`read_clip` read the same facts from decoded frames
(what a stub OpenAI endpoint in the tests answers from the frames it is sent).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longvila_jax.core.errors import InputError, brief, brief_path
from longvila_jax.core.safe_load import load_json
from longvila_jax.core.safe_paths import write_atomic
from longvila_jax.data.glyphs import COLOURS, read_number, render_number
from longvila_jax.data.video import write_video

TRUTH_VERSION = 1
SCENE_COLOURS = tuple(c for c in COLOURS if c != "gray")
DIRECTIONS = ("left", "right")
SCENE_SECONDS = (10, 20)
MAX_SHAPES = 9
MAX_TRUTH_BYTES = 1 << 20
MAX_SCENES = 10_000
_MARGIN = 2  # pixels between the squares' group and the frame's edge
_WHITE, _DARK = 180, 90  # min channel of a white pixel, max channel of a black one
_SCENE_RE = (
    r"(?P<colour>[a-z]+) scene shows the number (?P<number>\d{1,3}) while "
    r"(?P<shapes>[1-9]) white (?P<noun>square moves|squares move) (?P<direction>left|right)\."
)
_FIRST_RE = re.compile("(?P<article>An?) " + _SCENE_RE, re.ASCII)
_NEXT_RE = re.compile(" Then (?P<article>an?) " + _SCENE_RE, re.ASCII)


def _layout(size: int) -> dict[str, int]:
    """Where the squares go at frame side ``size``: the strip below the digit.

    ``render_number`` centres one digit of scale ``s`` (5 s rows); the strip is what is left
    below it, the squares (side ``sq``, ``sq`` apart, rows from ``top``) sit in its middle, and
    the trailing bar (``trail_h`` rows, ``sq`` long, 1 px from the last square) in theirs.
    """
    scale = max(1, min((size * 3 // 4) // 3, (size * 3 // 4) // 5))
    strip = (size - 5 * scale) // 2 + 5 * scale
    sq = max(3, size // 10)
    top = strip + max(0, (size - strip - sq) // 2)
    trail_h = max(2, sq // 3)
    return dict(sq=sq, top=top, trail_top=top + (sq - trail_h) // 2, trail_h=trail_h)


def _scene_frames(scene: dict, n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: the scene's ``n`` frames, squares moving from one side to the
    other (first frame at one margin, last frame at the other)."""
    lay = _layout(size)
    sq, k = lay["sq"], scene["shapes"]
    width = k * sq + (k - 1) * sq + 1 + sq  # squares sq apart, then 1 px and the trail
    lo, hi = _MARGIN, size - _MARGIN - width
    if hi <= lo:
        raise ValueError(f"{k} squares do not fit a {size}-pixel frame")
    base = render_number(scene["number"], size, COLOURS[scene["colour"]])
    frames = np.broadcast_to(base, (n, *base.shape)).copy()
    right = scene["direction"] == "right"
    for f in range(n):
        t = f / max(n - 1, 1)
        x = int(round(lo + (hi - lo) * (t if right else 1.0 - t)))
        # The trail lies behind the squares: on the left when they move right.
        sx = x + sq + 1 if right else x
        tx = x if right else x + width - sq
        rows = slice(lay["trail_top"], lay["trail_top"] + lay["trail_h"])
        frames[f, rows, tx : tx + sq] = 0
        for j in range(k):
            x0 = sx + 2 * j * sq
            frames[f, lay["top"] : lay["top"] + sq, x0 : x0 + sq] = 255
    return frames


def _fresh(rng: np.random.Generator, options: Sequence[str], out: list[dict], key: str) -> str:
    """A value of ``options`` no earlier scene has (any but the last scene's once all are used)."""
    pool = [o for o in options if o not in {s[key] for s in out}]
    return str(rng.choice(pool or [o for o in options if o != out[-1][key]]))


def _random_scenes(rng: np.random.Generator, scenes: int) -> list[dict]:
    """Scene contents and times: durations of 10 or 20 s; colours and numbers all distinct
    while the palette and the ten digits last, never the previous scene's after that."""
    out: list[dict] = []
    start = 0
    for k in range(scenes):
        colour = _fresh(rng, SCENE_COLOURS, out, "colour")
        number = _fresh(rng, [str(d) for d in range(10)], out, "number")
        seconds = int(rng.choice(SCENE_SECONDS))
        shapes, direction = int(rng.integers(1, 4)), DIRECTIONS[int(rng.integers(2))]
        end = float(start + seconds)
        out.append(dict(index=k, start_s=float(start), end_s=end, colour=colour, number=number))
        out[-1].update(shapes=shapes, direction=direction)
        start += seconds
    return out


def generate_long(
    out: Path, seed: int, count: int = 2, size: int = 64, fps: int = 2, scenes: int = 6
) -> list[dict]:
    """Writes ``count`` long videos with their truth sidecars, and ``longvideos.json``.

    Args:
      out: the corpus folder; videos go to ``out/longvideos/``.
      seed: mixed with 17 into this function's own generator, so the rest of the corpus draws
        the same random numbers with or without long videos.
      count: videos (0 writes nothing).
      size: frame side in pixels (even, >= 32).
      fps: frames per second (an integer, so that 10 s boundaries fall on frames).
      scenes: scenes per video.

    Returns:
      the truth dicts, as written to the sidecars (module docstring).
    """
    if count <= 0:
        return []
    if size < 32 or size % 2 or fps < 1 or scenes < 1:
        raise ValueError(f"need an even size >= 32, fps >= 1, scenes >= 1: {size}, {fps}, {scenes}")
    rng = np.random.default_rng([seed, 17])
    folder = out / "longvideos"
    folder.mkdir(parents=True, exist_ok=True)
    truths, listing = [], []
    for v in range(count):
        plan = _random_scenes(rng, scenes)
        n = int(plan[-1]["end_s"]) * fps
        times = np.arange(n) / fps
        parts = []
        for s in plan:
            inside = int(np.count_nonzero((times >= s["start_s"]) & (times < s["end_s"])))
            parts.append(_scene_frames(s, inside, size))
        frames = np.concatenate(parts)
        meta = {"fps": fps, "frame_count": n, "duration_s": n / fps}
        truth = {"version": TRUTH_VERSION, **meta, "size": size, "scenes": plan}
        name = f"long_{v:04d}"
        partial = folder / f".{name}.partial.mp4"  # the suffix tells PyAV the container
        write_video(partial, frames, fps=fps, gop=10 * fps)
        os.replace(partial, folder / f"{name}.mp4")
        write_atomic(folder / f"{name}.truth.json", json.dumps(truth, indent=1).encode())
        truths.append(truth)
        rel = f"longvideos/{name}"
        listing.append({"video": f"{rel}.mp4", "truth": f"{rel}.truth.json", **meta})
    write_atomic(out / "longvideos.json", json.dumps(listing, indent=1).encode())
    return truths


def truth_path(video_path: str | os.PathLike) -> Path:
    """The sidecar of a video: ``x/long_0000.mp4`` -> ``x/long_0000.truth.json``."""
    p = Path(video_path)
    return p.with_name(p.stem + ".truth.json")


def _int(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _number(lo: float, hi: float):  # ints too; huge ints and floats fail the range
    return lambda v: (_int(-math.inf, math.inf)(v) or isinstance(v, float)) and lo <= v <= hi


# field -> (check, what it must be); the messages quote the bad value through ``brief``.
_TRUTH_FIELDS = {
    "version": (_int(TRUTH_VERSION, TRUTH_VERSION), f"{TRUTH_VERSION}"),
    "fps": (_number(1e-3, 1e4), "a number in [0.001, 10000]"),
    "frame_count": (_int(1, 10**8), "an integer in [1, 1e8]"),
    "size": (_int(8, 8192), "an integer in [8, 8192]"),
    "duration_s": (_number(0.0, 1e7), "a number of seconds in [0, 1e7]"),
    "scenes": (lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_SCENES, "a list of scenes"),
}
_SCENE_FIELDS = {
    "index": (_int(0, MAX_SCENES), "the scene's position"),
    "start_s": (_number(0.0, 1e7), "a number of seconds in [0, 1e7]"),
    "end_s": (_number(0.0, 1e7), "a number of seconds in [0, 1e7]"),
    "colour": (lambda v: isinstance(v, str) and v in COLOURS, f"one of {list(COLOURS)}"),
    "number": (
        lambda v: isinstance(v, str) and re.fullmatch(r"\d{1,3}", v, re.ASCII) is not None,
        "a string of 1-3 digits",
    ),
    "shapes": (_int(1, MAX_SHAPES), f"an integer in [1, {MAX_SHAPES}]"),
    "direction": (lambda v: isinstance(v, str) and v in DIRECTIONS, f"one of {list(DIRECTIONS)}"),
}


def _check_fields(obj: Any, fields: dict, where: str, prefix: str) -> None:
    """Raises InputError naming ``where`` and the field unless ``obj`` is an object holding
    exactly ``fields``, each passing its check."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: field {prefix or '.'}: must be an object")
    missing = [f for f in fields if f not in obj]
    extra = sorted(str(f) for f in set(obj) - set(fields))
    if missing or extra:
        what = f"{missing[0]}: missing" if missing else f"{brief(extra[0])}: unknown field"
        raise InputError(f"{where}: field {prefix}{what}")
    for name, (ok, want) in fields.items():
        if not ok(obj[name]):
            raise InputError(
                f"{where}: field {prefix}{name}: must be {want}, got {brief(obj[name])}"
            )


def load_truth(video_path: str | os.PathLike) -> dict:
    """Reads and validates the truth sidecar of ``video_path`` (module docstring).

    Returns:
      the truth dict; its scenes tile ``[0, duration_s)`` in order.

    Raises:
      InputError: naming the sidecar and the field: missing or unreadable file, bad JSON, a
        missing, unknown, mistyped or out-of-range field, scenes that do not tile the video.
    """
    path = truth_path(video_path)
    truth = load_json(path, "truth sidecar", InputError, max_bytes=MAX_TRUTH_BYTES)
    where = f"truth sidecar {brief_path(path)}"
    _check_fields(truth, _TRUTH_FIELDS, where, "")
    duration = truth["frame_count"] / truth["fps"]
    if abs(truth["duration_s"] - duration) > 1e-6:
        raise InputError(f"{where}: field duration_s: must be frame_count / fps = {duration}")
    edge = 0.0
    for k, s in enumerate(truth["scenes"]):
        field = f"scenes[{k}]."
        _check_fields(s, _SCENE_FIELDS, where, field)
        # Scenes tile [0, duration): each starts where the one before it ended.
        for name, ok in (("index", s["index"] == k), ("start_s", abs(s["start_s"] - edge) < 1e-6)):
            if not ok:
                want = k if name == "index" else edge
                raise InputError(f"{where}: field {field}{name}: must be {want} (scenes in order)")
        if not s["end_s"] > s["start_s"]:
            raise InputError(f"{where}: field {field}end_s: must exceed start_s")
        edge = s["end_s"]
    if abs(edge - duration) > 1e-6:
        raise InputError(f"{where}: field {field}end_s: must be duration_s = {duration}")
    return truth


def frame_times(truth: dict, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """float64 [n] seconds shown by frames ``indices`` (frame ``i`` at ``i / fps``)."""
    return np.asarray(indices, np.float64) / float(truth["fps"])


def scenes_in_range(
    truth: dict, start_s: float, end_s: float, times: Sequence[float] | np.ndarray
) -> list[dict]:
    """The scenes, in order, that hold at least one of ``times`` lying in ``[start_s, end_s)``:
    what a captioner shown the frames at those times sees."""
    t = np.asarray(times, np.float64)
    t = t[(t >= start_s) & (t < end_s)]
    return [s for s in truth["scenes"] if np.any((t >= s["start_s"]) & (t < s["end_s"]))]


def _article(colour: str) -> str:
    return "an" if colour[:1] in "aeiou" else "a"


def _sentence(s: dict) -> str:
    noun = "square moves" if s["shapes"] == 1 else "squares move"
    c, k = s["colour"], s["shapes"]
    return f"{_article(c)} {c} scene shows the number {s['number']} while {k} white {noun} " + (
        f"{s['direction']}."
    )


def caption_for_scenes(scenes: Sequence[dict]) -> str:
    """The canonical caption of scenes in order (each a dict with colour, number, shapes,
    direction): "A red scene shows the number 7 while 3 white squares move right. Then an
    orange scene shows the number 2 while 1 white square moves left."."""
    if not scenes:
        raise ValueError("no scene to caption")
    text = " Then ".join(_sentence(s) for s in scenes)
    return text[0].upper() + text[1:]


def parse_caption(text: str) -> list[dict]:
    """Inverts :func:`caption_for_scenes` (surrounding whitespace ignored).

    Returns:
      one dict per scene: colour (str), number (str), shapes (int), direction (str).

    Raises:
      ValueError: for any other text (unknown colour, wrong agreement, trailing words).
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, not {type(text).__name__}")
    text = text.strip()
    out, pos, pattern = [], 0, _FIRST_RE
    while pos < len(text) or not out:
        m = pattern.match(text, pos)
        if m is None:
            raise ValueError(f"not a scene caption at character {pos}: {brief(text[pos:])}")
        shapes = int(m["shapes"])
        agrees = (m["noun"] == "square moves") == (shapes == 1)
        if (
            m["colour"] not in COLOURS
            or not agrees
            or m["article"].lower() != _article(m["colour"])
        ):
            raise ValueError(f"not a scene caption: {brief(m.group(0))}")
        scene = m.groupdict()
        del scene["noun"], scene["article"]
        out.append({**scene, "shapes": shapes})
        pos, pattern = m.end(), _NEXT_RE
    return out


def reference_caption(truth: dict) -> str:
    """The whole video's reference caption: every scene in order (the caption benchmark's
    reference, and what the oracle captioner says when it sees every scene)."""
    return caption_for_scenes(truth["scenes"])


def _colour_of(frame: np.ndarray) -> str:
    """Nearest ``COLOURS`` entry to the mean of the frame's two top corners (4x4 each)."""
    patch = np.concatenate([frame[:4, :4], frame[:4, -4:]]).reshape(-1, 3).mean(0)
    names = list(COLOURS)
    dist = [np.sum((patch - np.asarray(COLOURS[c], np.float64)) ** 2) for c in names]
    return names[int(np.argmin(dist))]


def _columns(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [size] columns holding a white square, and columns holding the dark trail."""
    lay = _layout(frame.shape[0])
    rows = frame[lay["top"] : lay["top"] + lay["sq"]].astype(np.int32)
    white = (rows.min(-1) > _WHITE).sum(0) >= max(1, lay["sq"] // 2)
    dark = (rows.max(-1) < _DARK).sum(0) >= 1
    return white, dark


def _runs(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask[1:] & ~mask[:-1]) + int(mask[0]))


def _majority(values: list, what: str) -> Any:
    value, _ = Counter(values).most_common(1)[0]
    if value is None:
        raise ValueError(f"cannot read the {what} of the scene")
    return value


def read_scene(frames: np.ndarray) -> dict:
    """Reads one scene from its frames (all of one background colour).

    Args:
      frames: uint8 [n, S, S, 3], n >= 1, in time order.

    Returns:
      {"colour", "number", "shapes", "direction"} as in the truth: the corners' colour, the
      digit (``glyphs.read_number``), the white runs in the squares' rows, and the direction
      of the squares' centroid from the first to the last frame (from the trail's side of the
      squares when they moved less than a pixel, e.g. one frame).

    Raises:
      ValueError: frames that show no readable scene.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, S, S, 3], got {frames.shape}")
    colours, numbers, shapes, trails, centres = [], [], [], [], []
    for f in frames:
        colours.append(_colour_of(f))
        d = read_number(f, 1)
        numbers.append(None if "?" in d else d)
        white, dark = _columns(f)
        shapes.append(_runs(white) or None)
        x = np.arange(len(white))
        cw = x[white].mean() if white.any() else None
        centres.append(cw)
        trails.append(None if cw is None or not dark.any() else x[dark].mean() < cw)
    direction = None
    if centres[0] is not None and centres[-1] is not None:
        shift = centres[-1] - centres[0]
        if abs(shift) >= 1.0:
            direction = "right" if shift > 0 else "left"
    if direction is None:
        direction = {True: "right", False: "left"}[_majority(trails, "direction")]
    return {
        "colour": _majority(colours, "colour"),
        "number": _majority(numbers, "number"),
        "shapes": _majority(shapes, "squares"),
        "direction": direction,
    }


def read_clip(frames: np.ndarray) -> list[dict]:
    """The scenes, in order, of uint8 [n, S, S, 3] frames in time order: runs of frames of one
    background colour (consecutive scenes never share one), each read by :func:`read_scene`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"frames must be [n, S, S, 3], got {frames.shape}")
    colours = [_colour_of(f) for f in frames]
    out, start = [], 0
    for i in range(1, len(frames) + 1):
        if i == len(frames) or colours[i] != colours[start]:
            out.append(read_scene(frames[start:i]))
            start = i
    return out


__all__ = [
    "DIRECTIONS",
    "SCENE_COLOURS",
    "caption_for_scenes",
    "frame_times",
    "generate_long",
    "load_truth",
    "parse_caption",
    "read_clip",
    "read_scene",
    "reference_caption",
    "scenes_in_range",
    "truth_path",
]
