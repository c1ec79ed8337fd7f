"""Synthetic corpus for the demo and the tests: ``python -m longvila_jax.data.synthetic OUT_DIR``.

Writes, in a few seconds on one core and without downloading anything:

- ``tokenizer/``: a byte-level BPE tokenizer (vocabulary <= 512) trained locally with
  ``tokenizers`` on the corpus text, with the ChatML (<|im_start|>, <|im_end|>, <|endoftext|>),
  Llama-3 header tokens and the media token ``<image>`` as special tokens at fixed ids
  (see ``SPECIAL_TOKENS``: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2, <image> = 3).
- ``images/`` + ``images.jsonl``: LLaVA-style captioned images (number and colour questions).
- ``videos/`` + ``videos_short.json`` (VILA JSON list, ``video`` key), ``videos_captions.jsonl``
  (``video_id`` + ``captions``), ``videos_qa.jsonl`` (``video_path`` + ``q``/``a``).
- ``needle_train.jsonl`` / ``needle_eval.jsonl``: long videos with a needle (a secret number on
  white) at a random depth, disjoint videos and numbers in the held-out split.
- ``interleaved.jsonl``: image-text documents; ``text.jsonl``: fixed-length pre-tokenised text.
- ``data.yaml``: a ``DataConfig`` mixing the training manifests, with ``root`` = OUT_DIR.

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
    """Trains the byte-level BPE and saves it in HF format (tokenizer.json + config)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def _needle_video(rng, n: int, size: int, secret: str) -> tuple[np.ndarray, float]:
    names = [c for c in COLOURS if c != "gray"]
    frames = np.stack([render_number("", size, COLOURS[names[rng.integers(len(names))]])] * n)
    for i in range(n):  # haystack: a different flat colour every 4 frames
        frames[i] = COLOURS[names[(i // 4 + int(rng.integers(2))) % len(names)]]
    span = max(2, n // 8)  # wide enough for uniform sampling of 8+ frames to hit it
    depth = float(rng.uniform(0, 1))
    start = min(int(depth * n), n - span)
    frames[start : start + span] = render_number(secret, size, (255, 255, 255))
    return frames, start / n


def generate(out: Path, seed: int = 0, size: int = 64, n_images: int = 24, n_videos: int = 12):
    """Writes the corpus under ``out`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "videos"):
        (out / sub).mkdir(exist_ok=True)
    colours = list(COLOURS)
    texts: list[str] = [QWEN2_SYSTEM, LLAMA3_SYSTEM, "system user assistant", NEEDLE_QUESTION]

    images, docs = [], []
    for i in range(n_images):
        num, col = str(rng.integers(0, 100)), colours[rng.integers(len(colours))]
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
        num, col = str(rng.integers(0, 100)), colours[rng.integers(len(colours))]
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

    needles: dict[str, list[dict]] = {"train": [], "eval": []}
    secrets = rng.permutation(90)[:8] + 10  # distinct two-digit numbers, split train/eval
    for i, secret in enumerate(secrets):
        split = "train" if i < 6 else "eval"
        frames, depth = _needle_video(rng, 96, size, str(secret))
        name = f"videos/needle_{i:03d}.mp4"
        write_video(out / name, frames, fps=8)
        needles[split].append(
            {
                "id": f"needle-{i}",
                "video": name,
                "depth": round(depth, 4),
                "conversations": [
                    {"from": "human", "value": f"<video>\n{NEEDLE_QUESTION}"},
                    {"from": "gpt", "value": str(secret)},
                ],
            }
        )
        texts.append(str(secret))

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
    _write_jsonl(out / "text.jsonl", long_text)
    _write_data_yaml(out, size)


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
    a = p.parse_args(argv)
    t = time.perf_counter()
    generate(a.out_dir, a.seed, a.size, a.images, a.videos)
    print(f"wrote synthetic corpus to {a.out_dir} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
