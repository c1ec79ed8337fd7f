"""Shared tiny model, prompts and references for the inference tests (imported by path)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

# LLVM -O0 roughly halves XLA:CPU compile time; the HLO (and so the numerics) is unchanged.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
IMAGE = 3  # the tiny configs' <image> id (the synthetic tokenizer's too)


def tiny_config():
    """configs/model/tiny-qwen2.yaml with 8 query heads (2 KV heads), so every Ulysses degree
    of an 8-device mesh divides the heads; fp32, no remat."""
    from longvila_jax.config.base import load_config
    from longvila_jax.config.model import ModelConfig

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(ModelConfig, root / "configs/model/tiny-qwen2.yaml")
    llm = dataclasses.replace(cfg.llm, num_attention_heads=8, num_key_value_heads=2)
    return dataclasses.replace(cfg, llm=llm, remat="none")


def prompts(cfg, seed: int = 0):
    """Two prompt rows of different lengths and frame counts (3 and 2 frames).

    Returns:
      (rows, pixel_values [5, S, S, 3] normalised float32, frames_per_row).
    """
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size

    def row(n_frames, n_text):
        frames = [x for _ in range(n_frames) for x in (IMAGE, 7)]  # "<image>\n" per frame
        head = rng.integers(10, 500, 4)
        tail = rng.integers(10, 500, n_text)
        return np.concatenate([head, frames, tail]).astype(np.int32)

    rows = [row(3, 9), row(2, 4)]
    pix = rng.uniform(-1, 1, (5, s, s, 3)).astype(np.float32)
    return rows, pix, [3, 2]


def recompute_logits(model, rows, pix, frames_per_row, generated):
    """Full recomputation without a cache: one dense single-device forward over prompt +
    generated tokens; returns, per row, the logits [n_generated, V] that chose each token.

    Rows are right-padded with text tokens to a common length; padding comes after every
    position that is read, so causality keeps it out of the result.
    """
    tpf = model.cfg.tokens_per_frame
    full = [np.concatenate([r, g[:-1]]) for r, g in zip(rows, generated, strict=True)]
    width = max(len(f) for f in full)
    ids = np.stack([np.pad(f, (0, width - len(f)), constant_values=11) for f in full])
    logits = np.asarray(model(ids, jax.numpy.asarray(pix)))
    out = []
    for b, (r, g, n) in enumerate(zip(rows, generated, frames_per_row, strict=True)):
        start = len(r) + n * (tpf - 1) - 1  # the prompt's last expanded position
        out.append(logits[b, start : start + len(g)])
    return out


def max_abs(x, y) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
