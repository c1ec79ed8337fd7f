"""Read HF / VILA JSON configs and the tokenizer into a validated ``ModelConfig``.

Two source layouts:
  * VILA (``llava_llama``): a top-level ``config.json`` (glue: ``llm_cfg``, ``vision_tower_cfg``,
    ``mm_projector_cfg``, ``mm_hidden_size``, ``mm_vision_select_layer`` ...) plus ``llm/``,
    ``vision_tower/`` and ``mm_projector/`` sub-folders whose own ``config.json`` files are
    authoritative. LongVILA-R1-style repos put a remote-code config (``auto_map``, model_type
    ``vila``) on top and the VILA-style one in ``config_vila_style.json``; the latter is read and
    no code is ever executed.
  * plain HF parts: a Llama/Qwen2 causal-LM folder and a SigLIP folder (stage 1 of training).

Every disagreement (top-level vs sub-folder configs, configs vs tensor shapes, vocabulary vs
tokenizer, image token id) raises ``ConfigError`` naming the field (the last three checks live
in ``config_checks``). Only JSON is parsed here;
tokenizers are loaded with ``trust_remote_code=False`` from local files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longvila_jax.ckpt.config_checks import (
    IMAGE_TOKEN,
    check_shapes,
    check_tokenizer,
    image_token_id,
    stored_dtype,
)
from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.config.base import ConfigError, apply_overrides
from longvila_jax.config.model import ModelConfig

COMPONENTS = ("llm", "vision_tower", "mm_projector")
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


@dataclass
class Source:
    """Where a model was read from: component folders and their parsed JSON configs.

    ``top`` is the VILA glue config (None for plain HF parts), ``top_file`` its file name.
    """

    layout: str  # "vila" | "hf_parts"
    dirs: dict[str, Path]
    configs: dict[str, dict]
    top: dict | None = None
    top_file: str | None = None
    root: Path | None = None
    notes: list[str] = field(default_factory=list)


def read_json(path: Path, what: str) -> dict:
    """Parses a JSON object file, raising ``ConfigError(what)`` when it is missing or invalid."""
    if not path.is_file():
        raise ConfigError(what, f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(what, f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path} must hold a JSON object")
    return data


def _rope(d: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(theta, rope_scaling) from transformers-5 ``rope_parameters`` or legacy keys."""
    rp = d.get("rope_parameters")
    if isinstance(rp, Mapping):
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        params = rp
    else:
        theta = d.get("rope_theta", 10000.0)
        params = d.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(params.get("factor", 1.0))}
    raise ConfigError("llm.rope_scaling", f"unsupported RoPE type {kind!r} (default, linear)")


def llm_fields(d: Mapping[str, Any]) -> dict:
    """``LLMConfig`` fields from an HF Llama / Qwen2 ``config.json`` dict."""
    arch = d.get("model_type")
    if arch not in _LLM_DEFAULTS:
        raise ConfigError("llm.arch", f"unsupported LLM model_type {arch!r} (llama, qwen2)")
    if d.get("use_sliding_window"):
        raise ConfigError("llm.use_sliding_window", "sliding-window attention is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError("llm.hidden_act", f"unsupported activation {act!r}")
    theta, scaling = _rope(d)
    heads = d.get("num_attention_heads", 32)
    out = dict(
        arch=arch,
        vocab_size=d.get("vocab_size", _LLM_DEFAULTS[arch]["vocab_size"]),
        hidden_size=d.get("hidden_size", 4096),
        intermediate_size=d.get("intermediate_size", 11008 if arch == "llama" else 22016),
        num_hidden_layers=d.get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=d.get(
            "max_position_embeddings", _LLM_DEFAULTS[arch]["max_position_embeddings"]
        ),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
        o_bias=False if arch == "qwen2" else bool(d.get("attention_bias", False)),
        mlp_bias=False if arch == "qwen2" else bool(d.get("mlp_bias", False)),
    )
    return out


def vision_fields(d: Mapping[str, Any]) -> dict:
    """``VisionConfig`` fields (without ``select_layer``) from a SigLIP config dict."""
    if d.get("model_type") == "siglip" or "vision_config" in d:
        d = d.get("vision_config") or {}
    mt = d.get("model_type", "siglip_vision_model")
    if mt not in ("siglip_vision_model", "siglip"):
        raise ConfigError("vision", f"unsupported vision tower model_type {mt!r} (SigLIP only)")
    return {k: d.get(k, v) for k, v in _SIGLIP_DEFAULTS.items()}


def load_tokenizer_dir(directory: Path):
    """Loads a tokenizer from local files only (never the hub, never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise ConfigError("tokenizer", f"cannot load a tokenizer from {directory}: {e}") from None


def _vila_top(root: Path) -> tuple[dict, str, list[str]]:
    top = read_json(root / "config.json", "config.json")
    notes = []
    if (root / "config_vila_style.json").is_file():
        # LongVILA-R1 style: config.json drives remote code; the VILA-style file is data.
        notes.append("read config_vila_style.json (config.json is a remote-code config)")
        return (
            read_json(root / "config_vila_style.json", "config_vila_style.json"),
            ("config_vila_style.json"),
            notes,
        )
    return top, "config.json", notes


def _cross_check(top_cfg: Any, sub: Mapping, keys: Sequence[str], top_name: str, sub_name: str):
    if not isinstance(top_cfg, Mapping):
        return
    if "vision_config" in top_cfg:
        top_cfg = top_cfg["vision_config"]
    if "vision_config" in sub:
        sub = sub["vision_config"]
    for k in keys:
        if k in top_cfg and k in sub and top_cfg[k] != sub[k]:
            raise ConfigError(
                f"{top_name}.{k}",
                f"top-level config says {top_cfg[k]!r}, {sub_name} says {sub[k]!r}",
            )


def token_order_default(projector_type: str, top: Mapping | None, llm_arch: str) -> str:
    """Block order of the merged projector tokens implied by the checkpoint generation.

    ``*_fix`` projectors and NVILA-era configs (media encoder / chat-template keys, or a Qwen2
    LLM) come from code that emits row-major blocks; Aug-2024 code (Llama-3-LongVILA, VILA1.5)
    emits them column-major (longvila.md section 3.2).
    """
    if projector_type.endswith("_fix"):
        return "row_major"
    if top is not None and any(
        k in top for k in ("image_encoder", "video_encoder", "chat_template")
    ):
        return "row_major"
    return "row_major" if llm_arch == "qwen2" else "col_major"


def read_vila(root: str | Path) -> tuple[dict, Source]:
    """Reads a VILA-layout directory.

    Returns:
      (model-config data before overrides, source description).
    """
    root = Path(root)
    top, top_file, notes = _vila_top(root)
    dirs = {c: root / c for c in COMPONENTS}
    for c, d in dirs.items():
        if not d.is_dir():
            raise ConfigError(c, f"{root} has no {c}/ sub-folder (not a VILA layout)")
    configs = {c: read_json(d / "config.json", f"{c}/config.json") for c, d in dirs.items()}
    llm = llm_fields(configs["llm"])
    vision = vision_fields(configs["vision_tower"])
    ptype = configs["mm_projector"].get("mm_projector_type")
    _cross_check(
        top.get("llm_cfg"),
        configs["llm"],
        (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_hidden_layers",
            "intermediate_size",
            "model_type",
        ),
        "llm_cfg",
        "llm/config.json",
    )
    _cross_check(
        top.get("vision_tower_cfg"),
        configs["vision_tower"],
        (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "image_size",
            "patch_size",
            "intermediate_size",
        ),
        "vision_tower_cfg",
        "vision_tower/config.json",
    )
    _cross_check(
        top.get("mm_projector_cfg"),
        configs["mm_projector"],
        ("mm_projector_type",),
        "mm_projector_cfg",
        "mm_projector/config.json",
    )
    if "hidden_size" in top and top["hidden_size"] != llm["hidden_size"]:
        raise ConfigError(
            "hidden_size",
            f"top-level config says {top['hidden_size']}, llm/config.json {llm['hidden_size']}",
        )
    if "mm_hidden_size" in top and top["mm_hidden_size"] != vision["hidden_size"]:
        raise ConfigError(
            "mm_hidden_size",
            f"top-level config says {top['mm_hidden_size']}, vision tower hidden_size is "
            f"{vision['hidden_size']}",
        )
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature != "cls_patch":
        raise ConfigError(
            "mm_vision_select_feature", f"only cls_patch is supported, got {feature!r}"
        )
    vision["select_layer"] = top.get("mm_vision_select_layer", -2)
    data = dict(
        vision=vision,
        projector=dict(type=ptype, token_order=token_order_default(str(ptype), top, llm["arch"])),
        llm=llm,
    )
    src = Source("vila", dirs, configs, top=top, top_file=top_file, root=root, notes=notes)
    return data, src


def read_hf_parts(
    llm_dir: str | Path, vision_dir: str | Path, projector_type: str
) -> tuple[dict, Source]:
    """Reads a plain HF LLM folder plus a SigLIP folder; the projector will be new."""
    dirs = {"llm": Path(llm_dir), "vision_tower": Path(vision_dir)}
    configs = {c: read_json(d / "config.json", f"{c}/config.json") for c, d in dirs.items()}
    llm = llm_fields(configs["llm"])
    vision = vision_fields(configs["vision_tower"])
    vision["select_layer"] = -2
    data = dict(
        vision=vision,
        projector=dict(type=projector_type, token_order="row_major"),
        llm=llm,
    )
    return data, Source("hf_parts", dirs, configs)


def build_config(
    data: dict,
    tokenizer,
    weights: Mapping[str, WeightSet],
    overrides: Sequence[str] = (),
) -> ModelConfig:
    """Completes the config data (image token, dtypes), applies ``--set`` overrides, validates.

    Raises:
      ConfigError: naming the field that disagrees with the tokenizer or the tensors.
    """
    data = dict(data)
    tid = image_token_id(tokenizer)
    keys = {o.partition("=")[0].strip() for o in overrides}
    if tid is None and "image_token_id" not in keys:
        raise ConfigError(
            "image_token_id",
            f"the tokenizer has no {IMAGE_TOKEN} token; pass --set image_token_id=<id>",
        )
    data["image_token_id"] = tid if tid is not None else 0
    dtype = stored_dtype(weights["llm"])
    data.setdefault("param_dtype", dtype)
    data.setdefault("compute_dtype", dtype)
    cfg = apply_overrides(ModelConfig, data, overrides)
    check_shapes(cfg, weights)
    check_tokenizer(cfg, tokenizer)
    return cfg
