"""Typed fields of HF ``config.json`` files: Llama/Qwen2 LLM and SigLIP vision configs.

Config files are downloaded, so every value taken from one is type-checked here, through one
getter (``typed``), before it reaches arithmetic or a comparison: a string where a number
belongs (``rope_theta: "abc"``), a list where an object belongs (``vision_config: [1]``,
``rope_parameters: 3``), or a size that is not a positive integer (``hidden_size: "64"``,
``num_hidden_layers: -1`` or ``true``) ends as a ``ConfigError`` naming the field
(``llm.rope_theta``), never as a ``TypeError`` from deep inside the converter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from longvila_jax.core.errors import ConfigError, brief

_LLM_DEFAULTS = {
    "llama": dict(vocab_size=32000, max_position_embeddings=2048),
    "qwen2": dict(vocab_size=151936, max_position_embeddings=32768),
}
# transformers' SiglipVisionConfig defaults, used for keys a config file leaves out.
_SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
_SIGLIP_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
)
_KIND_WORDS = {
    "size": "a positive integer",
    "positive": "a positive finite number",
    "number": "a finite number",
    int: "an integer",
    str: "a string",
    bool: "a boolean",
}


def _check(value: Any, kind: Any) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind == "size":
        return isinstance(value, int) and value > 0
    if kind in ("number", "positive"):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return ok and (kind == "number" or value > 0)
    return isinstance(value, kind)


def typed(
    d: Mapping[str, Any], key: str, kind: Any, default: Any, field: str, *, nullable: bool = False
) -> Any:
    """``d[key]`` checked against ``kind``, or ``default`` when the key is absent.

    Args:
      d: a parsed JSON object.
      key: the key.
      kind: ``"size"`` (positive int), ``"number"`` (finite int/float), ``"positive"``
        (positive finite number), or a type (``int``, ``str``, ``bool``); ints are never bools.
      default: returned when ``key`` is absent (and when it is null, with ``nullable``).
      field: the ``ModelConfig`` field named in errors.

    Raises:
      ConfigError(field): the value has the wrong type or range.
    """
    if key not in d or (nullable and d[key] is None):
        return default
    value = d[key]
    if not _check(value, kind):
        raise ConfigError(field, f"{key} must be {_KIND_WORDS[kind]}, got {brief(value)}")
    return float(value) if kind in ("number", "positive") else value


def optional_map(value: Any, field: str) -> Mapping | None:
    """``value`` if it is a JSON object, None if it is null or absent; anything else (a list,
    a string, a number) is a ``ConfigError`` naming ``field``."""
    if value is None or isinstance(value, Mapping):
        return value
    raise ConfigError(field, f"expected an object, got {brief(value)}")


def _rope(d: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(theta, rope_scaling) from transformers-5 ``rope_parameters`` or legacy keys."""
    # Both spellings are type-checked even when one wins: transformers reads the other too.
    rp = optional_map(d.get("rope_parameters"), "llm.rope_parameters")
    legacy = optional_map(d.get("rope_scaling"), "llm.rope_scaling")
    theta = typed(d, "rope_theta", "positive", 10000.0, "llm.rope_theta")
    if rp is not None:
        theta = typed(rp, "rope_theta", "positive", theta, "llm.rope_theta")
        params = rp
    else:
        params = legacy or {}
    kind = typed(params, "type", str, "default", "llm.rope_scaling")
    kind = typed(params, "rope_type", str, kind, "llm.rope_scaling")
    if kind == "default":
        return theta, None
    if kind == "linear":
        factor = typed(params, "factor", "positive", 1.0, "llm.rope_scaling.factor")
        return theta, {"type": "linear", "factor": factor}
    raise ConfigError("llm.rope_scaling", f"unsupported RoPE type {brief(kind)} (default, linear)")


def llm_fields(d: Mapping[str, Any]) -> dict:
    """``LLMConfig`` fields from an HF Llama / Qwen2 ``config.json`` dict.

    Raises:
      ConfigError: an unsupported architecture or feature, or a mistyped value (named).
    """
    arch = typed(d, "model_type", str, None, "llm.arch")
    if arch not in _LLM_DEFAULTS:
        raise ConfigError("llm.arch", f"unsupported LLM model_type {brief(arch)} (llama, qwen2)")
    if typed(d, "use_sliding_window", bool, False, "llm.use_sliding_window", nullable=True):
        raise ConfigError("llm.use_sliding_window", "sliding-window attention is not supported")
    act = typed(d, "hidden_act", str, "silu", "llm.hidden_act")
    if act != "silu":
        raise ConfigError("llm.hidden_act", f"unsupported activation {brief(act)}")
    theta, scaling = _rope(d)
    defaults = _LLM_DEFAULTS[arch]

    def size(key: str, default: Any, nullable: bool = False) -> Any:
        return typed(d, key, "size", default, f"llm.{key}", nullable=nullable)

    def flag(key: str) -> bool:
        return typed(d, key, bool, False, f"llm.{key}", nullable=True)

    heads = size("num_attention_heads", 32)
    bias = flag("attention_bias")
    return dict(
        arch=arch,
        vocab_size=size("vocab_size", defaults["vocab_size"]),
        hidden_size=size("hidden_size", 4096),
        intermediate_size=size("intermediate_size", 11008 if arch == "llama" else 22016),
        num_hidden_layers=size("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=size("num_key_value_heads", heads, nullable=True),
        head_dim=size("head_dim", None, nullable=True),
        rms_norm_eps=typed(d, "rms_norm_eps", "positive", 1e-6, "llm.rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=size(
            "max_position_embeddings", defaults["max_position_embeddings"]
        ),
        tie_word_embeddings=flag("tie_word_embeddings"),
        qkv_bias=True if arch == "qwen2" else bias,
        o_bias=False if arch == "qwen2" else bias,
        mlp_bias=False if arch == "qwen2" else flag("mlp_bias"),
    )


def vision_fields(d: Mapping[str, Any]) -> dict:
    """``VisionConfig`` fields (without ``select_layer``) from a SigLIP config dict.

    Raises:
      ConfigError: not a SigLIP config, or a mistyped value (named).
    """
    if d.get("model_type") == "siglip" or "vision_config" in d:
        d = optional_map(d.get("vision_config"), "vision.vision_config") or {}
    mt = typed(d, "model_type", str, "siglip_vision_model", "vision")
    if mt not in ("siglip_vision_model", "siglip"):
        raise ConfigError(
            "vision", f"unsupported vision tower model_type {brief(mt)} (SigLIP only)"
        )
    out: dict[str, Any] = {
        k: typed(d, k, "size", _SIGLIP_DEFAULTS[k], f"vision.{k}") for k in _SIGLIP_SIZES
    }
    out["hidden_act"] = typed(
        d, "hidden_act", str, _SIGLIP_DEFAULTS["hidden_act"], "vision.hidden_act"
    )
    out["layer_norm_eps"] = typed(
        d, "layer_norm_eps", "positive", _SIGLIP_DEFAULTS["layer_norm_eps"], "vision.layer_norm_eps"
    )
    return out


__all__ = ["llm_fields", "optional_map", "typed", "vision_fields"]
