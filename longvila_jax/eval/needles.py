"""V-NIAH needles generated locally: ``python -m longvila_jax.eval.needles OUT_DIR``.

The original harness reads 5 needles from the HF dataset ``lmms-lab/v_niah_needles`` (features
``image``, ``question``, ``answer``; split ``test``). We never download it; this module writes
needles of the same shape into a folder:

- ``OUT_DIR/needles.jsonl``: one ``{"id", "image", "question", "answer"}`` row per needle,
  ``image`` relative to ``OUT_DIR``;
- ``OUT_DIR/images/needle_<k>.png``: the needle image, a rendered number (the bitmap font of
  ``data.glyphs``, black on white, the style of the synthetic training needles) or a rendered
  word (Pillow's default FreeType font);
- optionally ``OUT_DIR/haystack.mp4`` (``--haystack-seconds``): a synthetic haystack of flat
  colours that change every second, for tests and the demo (the original uses a user-supplied
  movie).

Number needles ask the synthetic corpus's question (``data.synthetic.NEEDLE_QUESTION``) so that
a model trained on that corpus is asked what it was taught; ``--numbers`` picks the secrets
(e.g. the held-out ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_load import parse_json
from longvila_jax.core.safe_paths import open_regular, read_regular, resolve_inside
from longvila_jax.data.glyphs import COLOURS, render_number
from longvila_jax.data.image import load_image, to_rgb
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.synthetic import NEEDLE_QUESTION
from longvila_jax.data.video import write_video
from longvila_jax.eval.letterbox import pad_and_resize

WORD_QUESTION = "What is the secret word shown in the video?"
WORDS = ("apple", "river", "tiger", "piano", "cloud", "lemon", "rocket", "violet")
MANIFEST = "needles.jsonl"


@dataclasses.dataclass(frozen=True)
class Needle:
    """One needle: the image to insert and its question/answer.

    Attributes:
      id: name used in the results.
      image: uint8 [S, S, 3] RGB.
      question: asked after the frames.
      answer: the expected reply (compared lower-cased with spaces removed).
    """

    id: str
    image: np.ndarray
    question: str
    answer: str


def render_word(word: str, size: int) -> np.ndarray:
    """Black word centred on white, as large as fits 85 % of the width; uint8 [size, size, 3]."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font_size = size
    while font_size > 4:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        if right - left <= 0.85 * size and bottom - top <= 0.85 * size:
            break
        font_size -= 1
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.text(xy, word, fill=(0, 0, 0), font=font)
    return np.asarray(img, dtype=np.uint8)


def make_needles(
    count: int = 5,
    *,
    kind: str = "number",
    size: int = 64,
    seed: int = 0,
    numbers: Sequence[str] | None = None,
    words: Sequence[str] | None = None,
) -> list[Needle]:
    """Builds needles in memory.

    Args:
      count: needles to make (ignored when ``numbers`` / ``words`` are given).
      kind: ``number``, ``word`` or ``mixed`` (alternating, numbers first).
      size: image side in pixels.
      seed: picks the numbers / words when not given.
      numbers: explicit secret numbers (digit strings).
      words: explicit secret words.

    Returns:
      The needles, ids ``needle-0`` ... in order.
    """
    if kind not in ("number", "word", "mixed"):
        raise ValueError(f"kind must be number, word or mixed, got {kind!r}")
    rng = np.random.default_rng(seed)
    if numbers is None:
        numbers = [str(n) for n in rng.permutation(90)[:count] + 10]
    if words is None:
        words = [WORDS[i] for i in rng.permutation(len(WORDS))[: min(count, len(WORDS))]]
    for n in numbers:
        if not n.isdigit():
            raise ValueError(f"numbers: {n!r} is not a string of digits")
    if kind == "number":
        specs = [("number", n) for n in numbers]
    elif kind == "word":
        specs = [("word", w) for w in words]
    else:
        n = min(count, 2 * len(numbers), 2 * len(words) + 1)
        specs = [
            ("number", numbers[i // 2]) if i % 2 == 0 else ("word", words[i // 2]) for i in range(n)
        ]
    out = []
    for k, (what, value) in enumerate(specs):
        if what == "number":
            image = render_number(value, size, (255, 255, 255))
            question = NEEDLE_QUESTION
        else:
            image = render_word(value, size)
            question = WORD_QUESTION
        out.append(Needle(f"needle-{k}", image, question, value))
    return out


def write_needles(out_dir: str | Path, needles: Sequence[Needle]) -> Path:
    """Writes ``needles.jsonl`` + ``images/`` under ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, needle in enumerate(needles):
        image = f"images/needle_{k}.png"
        Image.fromarray(needle.image).save(out / image)
        rows.append(
            {"id": needle.id, "image": image, "question": needle.question, "answer": needle.answer}
        )
    path = out / MANIFEST
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _padded_image(path: Path, size: int) -> np.ndarray:
    """The image at its own resolution, letterboxed and resized (``eval.letterbox``)."""
    with open_regular(path, "needle image", InputError) as f:
        try:
            with Image.open(f) as img:  # Pillow's decompression-bomb limit applies
                img.load()
                rgb = np.asarray(to_rgb(img), np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: unreadable image ({brief(str(e))})") from None
    return pad_and_resize(rgb, size)


def load_needles(needles_dir: str | Path, size: int, pad: bool = False) -> list[Needle]:
    """Reads a needles folder (``needles.jsonl`` + images), images resized to ``size``
    (``pad``: letterboxed onto a mean-colour square first, upstream's ``"pad"``).

    The manifest goes through the checked JSON loader and image paths must be relative
    paths that stay inside the folder (``core.safe_paths``).

    Raises:
      InputError: missing manifest, bad rows (named by line) or unreadable images.
    """
    root = Path(needles_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"needles: {path} not found (make one with longvila_jax.eval.needles)")
    out = []
    raw = read_regular(path, "needles", InputError)
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        row = parse_json(line, where, InputError)
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        for key in ("image", "question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise InputError(f"{where}: field {key!r} must be a non-empty string")
        image_path = resolve_inside(root, row["image"], f"{where}: image", InputError)
        try:
            image = _padded_image(image_path, size) if pad else load_image(image_path, size)
        except (SampleSkipped, FileNotFoundError, InputError) as e:
            raise InputError(f"{where}: image {brief(row['image'])}: {e}") from None
        needle_id = str(row.get("id", f"needle-{len(out)}"))
        out.append(Needle(needle_id, image, row["question"], row["answer"]))
    if not out:
        raise InputError(f"needles: {path} holds no needle")
    return out


def numbers_from_manifest(path: str | Path) -> list[str]:
    """Secret numbers of a synthetic needle manifest (``needle_eval.jsonl`` of
    ``data.synthetic``): the first assistant reply of every row, in order."""
    out = []
    raw = read_regular(path, "needle manifest", InputError)
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        row = parse_json(line, where, InputError)
        turns = row.get("conversations") if isinstance(row, dict) else None
        replies = [
            t.get("value")
            for t in (turns if isinstance(turns, list) else [])
            if isinstance(t, dict) and t.get("from") == "gpt"
        ]
        if not replies or not isinstance(replies[0], str) or not replies[0].strip().isdigit():
            raise InputError(f"{where}: no numeric assistant reply")
        out.append(replies[0].strip())
    return out


def make_haystack_video(
    path: str | Path, seconds: int, *, fps: int = 8, size: int = 64, seed: int = 0
) -> None:
    """Writes a haystack video of flat colours (one colour per second, white never used).

    Args:
      path: output ``.mp4``.
      seconds: duration; a 1 fps sampler gets ``seconds`` frames.
      fps: frames per second of the file.
      size: frame side (even).
      seed: colour sequence.
    """
    names = [c for c in COLOURS if c != "gray"]
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(names), size=seconds)
    frames = np.empty((seconds * fps, size, size, 3), np.uint8)
    for s, c in enumerate(picks):
        frames[s * fps : (s + 1) * fps] = COLOURS[names[c]]
    write_video(path, frames, fps=fps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.eval.needles", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--kind", choices=("number", "word", "mixed"), default="number")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numbers", help="comma-separated secret numbers (overrides --count)")
    parser.add_argument("--words", help="comma-separated secret words")
    parser.add_argument("--haystack-seconds", type=int, default=0, help="also write haystack.mp4")
    parser.add_argument("--haystack-fps", type=int, default=8)
    args = parser.parse_args(argv)
    needles = make_needles(
        args.count,
        kind=args.kind,
        size=args.size,
        seed=args.seed,
        numbers=args.numbers.split(",") if args.numbers else None,
        words=args.words.split(",") if args.words else None,
    )
    path = write_needles(args.out_dir, needles)
    print(f"wrote {len(needles)} needles to {path}")
    if args.haystack_seconds:
        video = args.out_dir / "haystack.mp4"
        make_haystack_video(
            video, args.haystack_seconds, fps=args.haystack_fps, size=args.size, seed=args.seed
        )
        print(f"wrote {video} ({args.haystack_seconds} s at {args.haystack_fps} fps)")


if __name__ == "__main__":
    main()
