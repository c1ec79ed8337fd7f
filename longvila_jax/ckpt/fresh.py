"""Write a VILA-layout checkpoint for a model that was not imported (random init, tiny demos).

``vila_export`` reproduces the exact layout a model was imported from. A model built from a
config alone (the demo, tests, a stage-1 run from random weights) has no such source, so this
module generates one: HF configs for ``llm/`` (Llama / Qwen2) and ``vision_tower/`` (SigLIP
without attention-pool head, like NVILA's 448 px tower), VILA glue configs, safetensors in the
torch layout and the tokenizer files. The SigLIP layers the model does not run (beyond
``select_layer``) and ``post_layernorm`` are written too, freshly initialised, so the result is a
complete ``SiglipVisionModel`` checkpoint that transformers loads.

The output is a VILA layout for PyTorch, not a project checkpoint, so it carries no integrity
manifest; the tokenizer files are copied as regular files only (never through a link out of
the tokenizer folder, never from a FIFO).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from transformers import LlamaConfig, Qwen2Config, SiglipVisionConfig

from longvila_jax.ckpt import mapping
from longvila_jax.ckpt.hf_config import token_order_default
from longvila_jax.ckpt.hf_parts_import import top_level_config
from longvila_jax.ckpt.orbax_io import atomic_dir
from longvila_jax.ckpt.safetensors_writer import write_tensors
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.safe_paths import copy_file, is_regular

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def hf_llm_config(cfg: ModelConfig) -> dict:
    """The ``llm/config.json`` of a Llama or Qwen2 decoder with ``cfg.llm``'s shapes."""
    lc = cfg.llm
    rope = {"rope_theta": lc.rope_theta, "rope_type": "default"}
    if lc.rope_scaling is not None:
        rope = {
            "rope_theta": lc.rope_theta,
            "rope_type": "linear",
            "factor": lc.rope_scaling.factor,
        }
    common = dict(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=lc.max_position_embeddings,
        tie_word_embeddings=lc.tie_word_embeddings,
        rope_parameters=rope,
        dtype=cfg.param_dtype,
    )
    if lc.head_dim is not None:
        common["head_dim"] = lc.head_dim
    if lc.arch == "qwen2":
        if not lc.qkv_bias or lc.o_bias or lc.mlp_bias:
            raise ValueError("a Qwen2 config has q/k/v biases only (qkv_bias=True, o/mlp off)")
        out = Qwen2Config(**common).to_dict()
        out["architectures"] = ["Qwen2ForCausalLM"]
    else:
        if lc.qkv_bias != lc.o_bias:
            raise ValueError("Llama's attention_bias covers q/k/v and o together")
        out = LlamaConfig(**common, attention_bias=lc.qkv_bias, mlp_bias=lc.mlp_bias).to_dict()
        out["architectures"] = ["LlamaForCausalLM"]
    return out


def hf_vision_config(cfg: ModelConfig) -> dict:
    """The ``vision_tower/config.json`` of a head-less SigLIP with ``cfg.vision``'s shapes."""
    vc = cfg.vision
    out = SiglipVisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads,
        num_channels=vc.num_channels,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        hidden_act=vc.hidden_act,
        layer_norm_eps=vc.layer_norm_eps,
        vision_use_head=False,
        dtype=cfg.param_dtype,
    ).to_dict()
    out["architectures"] = ["SiglipVisionModel"]
    return out


def _unused_vision_tensors(
    cfg: ModelConfig, used: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """Fresh tensors for SigLIP layers past ``layers_used`` and ``post_layernorm``."""
    rng = np.random.default_rng(seed)
    dtype = next(iter(used.values())).dtype
    layer0 = {
        n[len("encoder.layers.0.") :]: a
        for n, a in used.items()
        if n.startswith("encoder.layers.0.")
    }
    out = {}

    def fresh(suffix: str, like: np.ndarray) -> np.ndarray:
        if re.search(r"layer_norm\d?\.weight$|layernorm\.weight$", suffix):
            return np.ones(like.shape, dtype)
        if suffix.endswith("bias"):
            return np.zeros(like.shape, dtype)
        return (0.02 * rng.standard_normal(like.shape)).astype(dtype)

    for i in range(cfg.vision.layers_used, cfg.vision.num_hidden_layers):
        for suffix, like in layer0.items():
            out[f"encoder.layers.{i}.{suffix}"] = fresh(suffix, like)
    width = (cfg.vision.hidden_size,)
    out["post_layernorm.weight"] = np.ones(width, dtype)
    out["post_layernorm.bias"] = np.zeros(width, dtype)
    return out


def _with_token_order(cfg: ModelConfig, top: dict) -> dict:
    """Marks the glue config so that importers infer ``cfg.projector.token_order`` from it.

    VILA checkpoints do not store the order; it follows from the code generation (NVILA-era
    configs carry media-encoder keys). A Llama model with row-major blocks gets such a key; a
    Qwen2 model with column-major blocks cannot be expressed and is refused.
    """
    want = cfg.projector.token_order
    if token_order_default(cfg.projector.type, top, cfg.llm.arch) == want:
        return top
    if want == "row_major":
        return {
            **top,
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
        }
    raise ValueError(
        f"projector.token_order={want!r} with a {cfg.llm.arch} LLM and projector "
        f"{cfg.projector.type!r} cannot be expressed in a VILA layout (importers read it as "
        "row_major); import such a checkpoint with --set projector.token_order=col_major"
    )


def write_vila(model, tokenizer_dir: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """Writes ``model`` (a ``LongVILA``) as a VILA-layout checkpoint in the new directory ``out``.

    Args:
      model: the model whose parameters are written (any dtype policy; params as stored).
      tokenizer_dir: a local HF tokenizer directory containing the ``<image>`` token.
      out: output directory; must not exist. Written atomically.
      seed: seed of the unused SigLIP tensors.

    Returns:
      ``out`` as a Path.
    """
    cfg: ModelConfig = model.cfg
    tokenizer_dir = Path(tokenizer_dir)
    configs = {
        "llm": hf_llm_config(cfg),
        "vision_tower": hf_vision_config(cfg),
        "mm_projector": {
            "architectures": ["MultimodalProjector"],
            "mm_projector_type": cfg.projector.type,
            "model_type": "v2l_projector",
            "dtype": cfg.param_dtype,
        },
    }
    with atomic_dir(out) as tmp:
        for component, conf in configs.items():
            sub = tmp / component
            sub.mkdir()
            (sub / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
            tensors = mapping.export_state_dict(model, component)
            if component == "vision_tower":
                tensors.update(_unused_vision_tensors(cfg, tensors, seed))
            write_tensors(sub, dict(sorted(tensors.items())))
        copied = [f for f in TOKENIZER_FILES if is_regular(tokenizer_dir / f, tokenizer_dir)]
        if "tokenizer.json" not in copied:
            raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json")
        for f in copied:
            copy_file(tokenizer_dir / f, tmp / "llm" / f, f, root=tokenizer_dir)
        top = _with_token_order(cfg, top_level_config(cfg, configs))
        (tmp / "config.json").write_text(json.dumps(top, indent=2) + "\n")
    return Path(out)
