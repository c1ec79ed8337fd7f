"""longvila-jax: LongVILA (long-context video VLM) in JAX/Flax NNX with multi-modal sequence
parallelism.

Public API (imported lazily, so ``import longvila_jax`` does no work):

- ``load_pretrained(path)``: a ``LongVILA`` model from a VILA-layout or project checkpoint.
- ``load_tokenizer(path)``: its HF tokenizer (local files only).
- ``LongVILA``, ``ModelConfig``: the model and its config schema.
- ``mmsp_attention``: 2D (Ulysses x zigzag ring) attention on global arrays, no model needed.
- ``make_mmsp_attention``: the same as a pluggable ``AttentionFn`` for the model.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_pretrained": "longvila_jax.ckpt.pretrained",
    "load_tokenizer": "longvila_jax.ckpt.pretrained",
    "LongVILA": "longvila_jax.models.vlm",
    "ModelConfig": "longvila_jax.config.model",
    "mmsp_attention": "longvila_jax.parallel.attention",
    "make_mmsp_attention": "longvila_jax.parallel.attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longvila_jax' has no attribute {name!r}")
