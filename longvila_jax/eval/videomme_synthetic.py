"""A tiny VideoMME-format set whose answers are visible: ``python -m
longvila_jax.eval.videomme_synthetic OUT_DIR``.

Writes ``OUT_DIR/videos/<videoID>.mp4`` and ``OUT_DIR/videomme.json``, a JSON list of rows with
the HF ``lmms-lab/Video-MME`` fields (``video_id``, ``duration``, ``domain``, ``sub_category``,
``url``, ``videoID``, ``question_id``, ``task_type``, ``question``, ``options``, ``answer``).
Each video shows one number in large flat digits on a flat background colour (``data.glyphs``)
and gets two questions (the number, the colour) with options A-D. The duration buckets are
short / medium / long by video length (1x, 2x, 4x ``base_seconds``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from longvila_jax.data.glyphs import COLOURS, render_number
from longvila_jax.data.video import write_video

LETTERS = "ABCD"


def _options(rng, correct: str, pool: list[str]) -> tuple[list[str], str]:
    others = [p for p in pool if p != correct]
    picks = [correct, *rng.choice(others, size=3, replace=False).tolist()]
    order = rng.permutation(4)
    values = [picks[i] for i in order]
    answer = LETTERS[int(np.flatnonzero(order == 0)[0])]
    return [f"{LETTERS[i]}. {v}." for i, v in enumerate(values)], answer


def make_synthetic_videomme(
    out_dir: str | Path,
    *,
    per_bucket: int = 2,
    size: int = 64,
    fps: int = 4,
    base_seconds: int = 2,
    seed: int = 0,
) -> Path:
    """Writes the set; returns the annotation file path (see the module docstring)."""
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = [c for c in COLOURS if c != "gray"]
    numbers = [str(n) for n in range(10, 100)]
    rows = []
    k = 0
    for b, bucket in enumerate(("short", "medium", "long")):
        seconds = base_seconds * 2**b
        for _ in range(per_bucket):
            k += 1
            vid, yt = f"{k:03d}", f"synth{k:03d}"
            number, colour = numbers[rng.integers(len(numbers))], colours[rng.integers(6)]
            frame = render_number(number, size, COLOURS[colour])
            write_video(out / "videos" / f"{yt}.mp4", np.stack([frame] * (seconds * fps)), fps)
            common = {
                "video_id": vid,
                "duration": bucket,
                "domain": "Knowledge",
                "sub_category": "Synthetic",
                "url": f"synthetic://{yt}",
                "videoID": yt,
            }
            questions = [
                ("Counting Problem", "What number is shown in the video?", number, numbers),
                ("Attribute Perception", "What colour is the background?", colour, colours),
            ]
            for j, (task, question, correct, pool) in enumerate(questions, 1):
                options, answer = _options(rng, correct, pool)
                rows.append(
                    {
                        **common,
                        "question_id": f"{vid}-{j}",
                        "task_type": task,
                        "question": question,
                        "options": options,
                        "answer": answer,
                    }
                )
    path = out / "videomme.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m longvila_jax.eval.videomme_synthetic",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-bucket", type=int, default=2, help="videos per duration bucket")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--base-seconds", type=int, default=2, help="length of a 'short' video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_synthetic_videomme(
        args.out_dir,
        per_bucket=args.per_bucket,
        size=args.size,
        fps=args.fps,
        base_seconds=args.base_seconds,
        seed=args.seed,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
