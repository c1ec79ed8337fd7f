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
in ``config_checks``). Only JSON is parsed here, with the checked loader (``core.safe_load``:
regular files inside the source folder, no duplicate keys, bounded size and depth), and every
value taken from it is type-checked by the getters of ``hf_fields`` (a string where a number
belongs, a list where an object belongs, a size that is not a positive integer all end as a
``ConfigError`` naming the field); tokenizers are loaded with ``trust_remote_code=False`` from
local files whose folder was checked first (no FIFOs, no links out of the source).
"""

from __future__ import annotations

import os
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
from longvila_jax.ckpt.hf_fields import llm_fields, optional_map, typed, vision_fields
from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.config.base import ConfigError, apply_overrides
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.errors import brief
from longvila_jax.core.safe_load import MAX_CONFIG_BYTES, parse_json
from longvila_jax.core.safe_paths import check_folder, read_regular

COMPONENTS = ("llm", "vision_tower", "mm_projector")


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


def read_json(path: Path, what: str, root: str | os.PathLike | None = None) -> dict:
    """Parses a JSON object file with the checked loader.

    Args:
      path: the file.
      what: the field name for errors (``config.json``, ``llm/config.json``).
      root: the source folder: a symlink of ``path`` must stay inside it.

    Raises:
      ConfigError(what): missing, not a regular file (a FIFO ...), a link out of ``root``,
        invalid JSON (duplicate keys, too deep ...), or not an object.
    """
    raw = read_regular(path, what, ConfigError, max_bytes=MAX_CONFIG_BYTES, root=root)
    try:
        data = parse_json(raw, what, ConfigError)
    except ConfigError as e:
        raise ConfigError(what, f"{path} is not valid JSON: {e.message}") from None
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def load_tokenizer_dir(directory: Path, root: str | os.PathLike | None = None):
    """Loads a tokenizer from local files only (never the hub, never remote code).

    transformers opens the files itself, so the folder is checked first: no FIFO (it would
    hang the load) and no symlink out of ``root`` (default: the folder).

    Raises:
      CheckpointError: a special file or an escaping link in the folder (named).
      ConfigError: transformers cannot load a tokenizer from it.
    """
    from transformers import AutoTokenizer

    check_folder(directory, root if root is not None else directory, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # noqa: BLE001 (any failure of a third-party parser on the files)
        raise ConfigError(
            "tokenizer", f"cannot load a tokenizer from {directory}: {brief(str(e))}"
        ) from None


def _vila_top(root: Path) -> tuple[dict, str, list[str]]:
    top = read_json(root / "config.json", "config.json", root)
    notes = []
    if (root / "config_vila_style.json").is_file():
        # LongVILA-R1 style: config.json drives remote code; the VILA-style file is data.
        notes.append("read config_vila_style.json (config.json is a remote-code config)")
        return (
            read_json(root / "config_vila_style.json", "config_vila_style.json", root),
            ("config_vila_style.json"),
            notes,
        )
    return top, "config.json", notes


def _cross_check(top_cfg: Any, sub: Mapping, keys: Sequence[str], top_name: str, sub_name: str):
    top_cfg = optional_map(top_cfg, top_name)
    if top_cfg is None:
        return
    if "vision_config" in top_cfg:
        top_cfg = optional_map(top_cfg["vision_config"], f"{top_name}.vision_config") or {}
    if "vision_config" in sub:
        sub = optional_map(sub["vision_config"], f"{sub_name}.vision_config") or {}
    for k in keys:
        if k in top_cfg and k in sub and top_cfg[k] != sub[k]:
            raise ConfigError(
                f"{top_name}.{k}",
                f"top-level config says {brief(top_cfg[k])}, {sub_name} says {brief(sub[k])}",
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
    configs = {c: read_json(d / "config.json", f"{c}/config.json", root) for c, d in dirs.items()}
    llm = llm_fields(configs["llm"])
    vision = vision_fields(configs["vision_tower"])
    ptype = typed(configs["mm_projector"], "mm_projector_type", str, None, "projector.type")
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
    if ptype is None:
        raise ConfigError("projector.type", "mm_projector/config.json has no mm_projector_type")
    hidden = typed(top, "hidden_size", "size", None, "hidden_size")
    if hidden is not None and hidden != llm["hidden_size"]:
        raise ConfigError(
            "hidden_size",
            f"top-level config says {hidden}, llm/config.json {llm['hidden_size']}",
        )
    mm_hidden = typed(top, "mm_hidden_size", "size", None, "mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision["hidden_size"]:
        raise ConfigError(
            "mm_hidden_size",
            f"top-level config says {mm_hidden}, vision tower hidden_size is "
            f"{vision['hidden_size']}",
        )
    feature = typed(top, "mm_vision_select_feature", str, "cls_patch", "mm_vision_select_feature")
    if feature != "cls_patch":
        raise ConfigError(
            "mm_vision_select_feature", f"only cls_patch is supported, got {brief(feature)}"
        )
    vision["select_layer"] = typed(top, "mm_vision_select_layer", int, -2, "vision.select_layer")
    data = dict(
        vision=vision,
        projector=dict(type=ptype, token_order=token_order_default(ptype, top, llm["arch"])),
        llm=llm,
    )
    src = Source("vila", dirs, configs, top=top, top_file=top_file, root=root, notes=notes)
    return data, src


def read_hf_parts(
    llm_dir: str | Path, vision_dir: str | Path, projector_type: str
) -> tuple[dict, Source]:
    """Reads a plain HF LLM folder plus a SigLIP folder; the projector will be new."""
    dirs = {"llm": Path(llm_dir), "vision_tower": Path(vision_dir)}
    configs = {c: read_json(d / "config.json", f"{c}/config.json", d) for c, d in dirs.items()}
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
