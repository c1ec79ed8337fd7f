"""Synthetic corpus for the demo and the tests: ``python -m longvila_jax.data.synthetic OUT_DIR``.

Writes, in a few seconds on one core and without downloading anything:

- ``tokenizer/``: a byte-level BPE tokenizer (vocabulary <= 512) trained locally with
  ``tokenizers`` on the corpus text, with the ChatML (<|im_start|>, <|im_end|>, <|endoftext|>),
  Llama-3 header tokens and the media token ``<image>`` as special tokens at fixed ids
  (see ``SPECIAL_TOKENS``: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2, <image> = 3).
- ``images/`` + ``images.jsonl``: LLaVA-style captioned images (number and colour questions).
- ``videos/`` + ``videos_short.json`` (VILA JSON list, ``video`` key), ``videos_captions.jsonl``
  (``video_id`` + ``captions``), ``videos_qa.jsonl`` (``video_path`` + ``q``/``a``).
- ``needle_train.jsonl`` / ``needle_eval.jsonl``: needle videos in the V-NIAH format, one frame
  per second: a haystack of flat colours (a new colour every frame, as ``eval.needles``'
  haystack sampled at 1 fps) with one needle frame (a secret number on white) at a random depth.
  The held-out split has its own videos; with two-digit secrets (``digits=2``) its secrets also
  never occur as a training secret. ``needle_short.jsonl``: the same task on clips a quarter as
  long (stage 3's short-video curriculum).
- ``interleaved.jsonl``: image-text documents; ``text.jsonl``: fixed-length pre-tokenised text.
- ``data.yaml``: a ``DataConfig`` mixing the training manifests, with ``root`` = OUT_DIR.
- ``longvideos/`` + ``longvideos.json``: long videos of known scenes (colours, digits, moving
  squares) with ground-truth sidecars (``synthetic_long``), the long-video data engine's and
  the caption benchmark's input; written last from their own random stream, so the files above
  are the same with or without them.

Answers are visible in the frames: large flat digits and background colours (``glyphs``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longvila_jax.data.glyphs import COLOURS, render_number
from longvila_jax.data.synthetic_long import generate_long
from longvila_jax.data.text import LLAMA3_SYSTEM, QWEN2_SYSTEM, QWEN2_TEMPLATE
from longvila_jax.data.video import write_video

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
NEEDLE_QUESTION = "What is the secret number shown in the video?"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    """Trains the byte-level BPE and saves it in HF format (tokenizer.json + config).

    Digits are split one per token before BPE, as Qwen2's and Llama-3's tokenizers do, so a
    number is read digit by digit and an unseen number is still made of known tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    fast.chat_template = QWEN2_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _frames(rng, n: int, size: int, number: str, colour: str) -> np.ndarray:
    base = render_number(number, size, COLOURS[colour])
    return np.broadcast_to(base, (n, *base.shape)).copy()


def _needle_video(rng, n: int, size: int, secret: str) -> tuple[np.ndarray, int]:
    """``n`` frames: flat haystack colours (never white) and the secret on white at one frame."""
    names = [c for c in COLOURS if c != "gray"]
    rgb = np.asarray([COLOURS[names[k]] for k in rng.integers(len(names), size=n)], np.uint8)
    frames = np.broadcast_to(rgb[:, None, None, :], (n, size, size, 3)).copy()
    at = int(rng.integers(n))
    frames[at] = render_number(secret, size, (255, 255, 255))
    return frames, at


def _needles(rng, out: Path, size: int, counts: tuple[int, ...], n_frames: int, digits: int):
    """Writes the needle videos; returns the train and held-out manifest rows.

    One-digit secrets: the held-out split has new videos (haystacks, depths). Longer secrets:
    the held-out secrets are also never a training secret.
    """
    numbers = rng.permutation(np.arange(0 if digits == 1 else 10 ** (digits - 1), 10**digits))
    if digits == 1:
        pools = {"train": numbers, "eval": numbers}
    else:
        held_out = numbers[: max(1, min(10, counts[1]))]
        pools = {"train": numbers[len(held_out) :], "eval": held_out}
    pools["short"] = pools["train"]
    rows: dict[str, list[dict]] = {"train": [], "eval": [], "short": []}
    k = 0
    for split, count in zip(("train", "eval", "short"), counts, strict=True):
        if split == "short":  # stage 3's short clips: the same task at a quarter of the length
            n_frames = max(2, n_frames // 4)
        for _ in range(count):
            secret = str(rng.choice(pools[split]))
            frames, at = _needle_video(rng, n_frames, size, secret)
            name = f"videos/needle_{k:04d}.mp4"
            write_video(out / name, frames, fps=1)
            rows[split].append(
                {
                    "id": f"needle-{k}",
                    "video": name,
                    "frames": n_frames,
                    "needle_frame": at,
                    "depth": round(at / max(n_frames - 1, 1), 4),
                    "conversations": [
                        {"from": "human", "value": f"<video>\n{NEEDLE_QUESTION}"},
                        {"from": "gpt", "value": secret},
                    ],
                }
            )
            k += 1
    return rows


def generate(
    out: Path,
    seed: int = 0,
    size: int = 64,
    n_images: int = 24,
    n_videos: int = 12,
    n_needles: tuple[int, int] = (6, 2),
    needle_frames: int = 32,
    digits: int = 1,
    n_short_needles: int = 4,
    n_long: int = 2,
):
    """Writes the corpus under ``out`` (see the module docstring).

    Args:
      out: output folder (created).
      seed: every random choice.
      size: frame side in pixels (even).
      n_images, n_videos: captioned images and short videos.
      n_needles: (training, held-out) needle videos.
      needle_frames: frames (= seconds at 1 fps) per needle video.
      n_short_needles: needle clips of ``needle_frames // 4`` frames (``needle_short.jsonl``),
        the short-video curriculum of stage 3.
      n_long: long videos with ground truth (``synthetic_long.generate_long``; 0: none).
      digits: digits of every number shown (images, videos, needle secrets); 1 or 2 fit the
        64 px frames of the tiny model, which learns to read one digit per frame quickly.
    """
    if digits not in (1, 2):
        raise ValueError(f"digits must be 1 or 2, got {digits}")
    lo, hi = (0, 10) if digits == 1 else (10, 100)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "videos"):
        (out / sub).mkdir(exist_ok=True)
    colours = list(COLOURS)
    texts: list[str] = [QWEN2_SYSTEM, LLAMA3_SYSTEM, "system user assistant", NEEDLE_QUESTION]

    images, docs = [], []
    for i in range(n_images):
        num, col = str(rng.integers(lo, hi)), colours[rng.integers(len(colours))]
        name = f"images/img_{i:04d}.png"
        Image.fromarray(render_number(num, size, COLOURS[col])).save(out / name)
        q, a = [
            ("What number is shown?", num),
            ("What colour is the background?", col),
            ("Describe the image.", f"A {col} image showing the number {num}."),
        ][i % 3]
        images.append(
            {
                "id": f"img-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
            }
        )
        texts += [q, a]
    for i in range(0, n_images - 1, 2):
        parts = [f"<image> This {images[j]['id']} image is shown." for j in (i, i + 1)]
        docs.append(
            {
                "id": f"doc-{i}",
                "text": " ".join(parts),
                "images": [images[i]["image"], images[i + 1]["image"]],
            }
        )
        texts.append(docs[-1]["text"].replace("<image>", ""))

    short, caps, qa = [], [], []
    for i in range(n_videos):
        num, col = str(rng.integers(lo, hi)), colours[rng.integers(len(colours))]
        name = f"vid_{i:04d}"
        write_video(out / "videos" / f"{name}.mp4", _frames(rng, 16, size, num, col), fps=8)
        q, a = "What number appears in the video?", num
        short.append(
            {
                "id": f"vid-{i}",
                "video": f"videos/{name}.mp4",
                "conversations": [
                    {"from": "human", "value": f"<video>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
            }
        )
        caption = f"A {col} video showing the number {num}."
        caps.append({"id": f"cap-{i}", "video_id": f"videos/{name}", "captions": [caption]})
        qa.append(
            {"id": f"qa-{i}", "video_path": f"videos/{name}.mp4", "q": "Which colour?", "a": col}
        )
        texts += [q, a, caption, "Which colour?", col]

    needles = _needles(rng, out, size, (*n_needles, n_short_needles), needle_frames, digits)
    texts += [str(n) for n in range(100)]

    train_tokenizer(texts * 4, out / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    stream = tok(" ".join(rng.permutation(texts * 8).tolist()), add_special_tokens=False)
    ids = stream["input_ids"]
    chunk = 256
    long_text = [
        {"id": f"text-{k}", "text": ids[k * chunk : (k + 1) * chunk]}
        for k in range(len(ids) // chunk)
    ]

    _write_jsonl(out / "images.jsonl", images)
    _write_jsonl(out / "interleaved.jsonl", docs)
    (out / "videos_short.json").write_text(json.dumps(short, indent=1))
    _write_jsonl(out / "videos_captions.jsonl", caps)
    _write_jsonl(out / "videos_qa.jsonl", qa)
    _write_jsonl(out / "needle_train.jsonl", needles["train"])
    _write_jsonl(out / "needle_eval.jsonl", needles["eval"])
    _write_jsonl(out / "needle_short.jsonl", needles["short"])
    _write_jsonl(out / "text.jsonl", long_text)
    _write_data_yaml(out, size)
    generate_long(out, seed, n_long, size)


def _write_data_yaml(out: Path, size: int) -> None:
    import yaml

    datasets = [
        {"name": "images", "manifest": "images.jsonl", "kind": "image"},
        {"name": "videos", "manifest": "videos_short.json", "kind": "video"},
        {"name": "captions", "manifest": "videos_captions.jsonl", "kind": "video"},
        {"name": "qa", "manifest": "videos_qa.jsonl", "kind": "video"},
        {"name": "needle", "manifest": "needle_train.jsonl", "kind": "video", "weight": 2.0},
        {"name": "docs", "manifest": "interleaved.jsonl", "kind": "interleaved", "weight": 0.5},
    ]
    cfg = {
        "root": str(out.resolve()),
        "datasets": datasets,
        "image_size": size,
        "tokens_per_frame": 4,
        "num_video_frames": 8,
        "max_length": 512,
        "max_frames_per_row": 16,
        "decode_timeout_s": 30.0,
    }
    (out / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--needles", type=int, default=6, help="training needle videos")
    p.add_argument("--eval-needles", type=int, default=2, help="held-out needle videos")
    p.add_argument("--needle-frames", type=int, default=32)
    p.add_argument("--short-needles", type=int, default=4, help="short needle clips")
    p.add_argument("--digits", type=int, default=1, choices=(1, 2))
    p.add_argument("--long-videos", type=int, default=2, help="long videos with ground truth")
    a = p.parse_args(argv)
    t = time.perf_counter()
    generate(
        a.out_dir,
        a.seed,
        a.size,
        a.images,
        a.videos,
        (a.needles, a.eval_needles),
        a.needle_frames,
        a.digits,
        a.short_needles,
        a.long_videos,
    )
    print(f"wrote synthetic corpus to {a.out_dir} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
