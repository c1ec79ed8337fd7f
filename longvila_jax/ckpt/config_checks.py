"""Consistency checks of a ModelConfig against tensor shapes and the tokenizer.

Run on safetensors headers only (nothing is read) before any conversion starts, so a config
that disagrees with its weights or tokenizer fails fast with a ``ConfigError`` naming the field:
vocabulary rows vs ``vocab_size`` and tokenizer size (the tokenizer may exceed the table only by
VILA's media tokens, longvila.md section 3.3), heads and hidden size vs projection shapes, the
vision width and patch grid vs the patch and position embeddings, ``image_token_id`` vs the
tokenizer's ``<image>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.config.base import ConfigError
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.tokens import IMAGE_TOKEN, image_token_id

# VILA adds these to the tokenizer (llava/constants.py); they may lie past the embedding table.
MEDIA_TOKENS = ("<image>", "<vila/video>", "<vila/sentinel>")
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _tensor_shape(weights: WeightSet, *names: str) -> tuple[int, ...] | None:
    for n in names:
        if n in weights.where:
            return weights.info(n).shape
    return None


def check_shapes(cfg: ModelConfig, weights: Mapping[str, WeightSet]) -> None:
    """Config fields vs the shapes of a few defining tensors (header only, nothing is read)."""
    lc, vc = cfg.llm, cfg.vision
    emb = _tensor_shape(weights["llm"], "model.embed_tokens.weight")
    if emb is not None:
        if emb[0] != lc.vocab_size:
            raise ConfigError(
                "llm.vocab_size", f"config says {lc.vocab_size}, embed_tokens has {emb[0]} rows"
            )
        if emb[1] != lc.hidden_size:
            raise ConfigError(
                "llm.hidden_size",
                f"config says {lc.hidden_size}, embed_tokens has {emb[1]} columns",
            )
    for proj, heads, fld in (
        ("q_proj", lc.num_attention_heads, "llm.num_attention_heads"),
        ("k_proj", lc.num_key_value_heads, "llm.num_key_value_heads"),
    ):
        shape = _tensor_shape(weights["llm"], f"model.layers.0.self_attn.{proj}.weight")
        if shape is not None and shape[0] != heads * lc.dim_per_head:
            raise ConfigError(
                fld,
                f"{heads} heads x head_dim {lc.dim_per_head} != {proj} output {shape[0]}",
            )
    vis = weights.get("vision_tower")
    if vis is not None:
        pe = _tensor_shape(
            vis,
            "embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.weight",
        )
        if pe is not None and (pe[0] != vc.hidden_size or pe[2] != vc.patch_size):
            raise ConfigError(
                "vision.hidden_size",
                f"config says hidden {vc.hidden_size}, patch {vc.patch_size}; "
                f"patch_embedding is {pe}",
            )
        pos = _tensor_shape(
            vis,
            "embeddings.position_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
        )
        if pos is not None and pos[0] != vc.num_patches:
            raise ConfigError(
                "vision.image_size",
                f"{vc.num_patches} patches implied by the config, position_embedding has {pos[0]}",
            )


def stored_dtype(weights: WeightSet) -> str:
    """Numerics policy default: the dtype the LLM embedding is stored in."""
    for name in weights.names:
        if name.endswith("embed_tokens.weight"):
            return _DTYPES.get(weights.info(name).dtype, "float32")
    return "float32"


def check_tokenizer(cfg: ModelConfig, tokenizer) -> None:
    """Vocabulary and image-token consistency between the model config and the tokenizer."""
    n = len(tokenizer)
    rows = cfg.llm.vocab_size
    if n > rows:
        extra = tokenizer.convert_ids_to_tokens(list(range(rows, n)))
        bad = [t for t in extra if t not in MEDIA_TOKENS]
        if bad:
            raise ConfigError(
                "llm.vocab_size",
                f"tokenizer has {n} tokens but the embedding only {rows} rows; ids >= {rows} "
                f"must be media tokens {MEDIA_TOKENS}, found {bad[:5]}",
            )
    image_id = image_token_id(tokenizer)
    if image_id is not None and image_id != cfg.image_token_id:
        raise ConfigError(
            "image_token_id",
            f"config says {cfg.image_token_id} but the tokenizer's {IMAGE_TOKEN} is {image_id}",
        )
    if image_id is None and cfg.image_token_id < n:
        tok = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        raise ConfigError(
            "image_token_id",
            f"{cfg.image_token_id} is the tokenizer's ordinary token {tok!r}, not {IMAGE_TOKEN}",
        )
