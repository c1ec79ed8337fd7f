"""Tiny random VILA-layout checkpoints built offline with transformers and torch.

``build_vila`` writes what ``LlavaMetaModel.save_pretrained`` writes for a real LongVILA
release (longvila.md section 4): a ``llava_llama`` glue ``config.json``, ``llm/`` (HF causal LM
saved with ``save_pretrained`` and a small ``max_shard_size``, so it is sharded with an index,
plus a tokenizer that has ``<image>`` and the chat special tokens), ``vision_tower/`` (HF
``SiglipVisionModel``, optionally with the legacy ``vision_model.`` key prefix that VILA
releases use) and ``mm_projector/`` (the torch reference projector, ``layers.<slot>.*``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers.torch_projector import TorchProjector

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MEDIA = ["<image>", "<vila/video>"]


@dataclass(frozen=True)
class Spec:
    """Knobs of a tiny checkpoint."""

    arch: str = "qwen2"  # or "llama"
    dtype: torch.dtype = torch.float32
    siglip_prefix: bool = True
    projector_type: str = "mlp_downsample_2x2_fix"
    tied: bool = False
    vocab: int = 96  # embedding rows; the tokenizer's last two ids are the media tokens
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 96
    rope_theta: float = 15_300_000.0
    rope_scaling: float | None = None
    v_hidden: int = 32
    v_layers: int = 3
    v_image: int = 70  # 5 x 5 patches of 14: odd grid, padded to 6 x 6 by the projector
    max_shard_size: str = "40KB"
    seed: int = 0


def make_tokenizer(n_rows: int, media: bool = True) -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer with ``n_rows`` tokens: words, chat specials, then media tokens.

    With ``media=False`` (a plain LLM tokenizer) the media tokens are left out.
    """
    n_words = n_rows - len(SPECIALS) - (len(MEDIA) if media else 0)
    vocab = {f"w{i}": i for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w1", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_tokens(SPECIALS, special_tokens=True)
    if media:
        fast.add_tokens(MEDIA, special_tokens=True)
    if len(fast) != n_rows:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, wanted {n_rows}")
    return fast


def llm_config(s: Spec) -> tf.PretrainedConfig:
    kw = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=4096,
        rope_theta=s.rope_theta,
        tie_word_embeddings=s.tied,
        attn_implementation="eager",
    )
    if s.rope_scaling:
        kw["rope_scaling"] = {"rope_type": "linear", "factor": s.rope_scaling}
    if s.arch == "qwen2":
        return tf.Qwen2Config(rms_norm_eps=1e-6, **kw)
    return tf.LlamaConfig(rms_norm_eps=1e-5, **kw)


def vision_config(s: Spec) -> tf.SiglipVisionConfig:
    return tf.SiglipVisionConfig(
        hidden_size=s.v_hidden,
        intermediate_size=2 * s.v_hidden,
        num_hidden_layers=s.v_layers,
        num_attention_heads=4,
        image_size=s.v_image,
        patch_size=14,
        attn_implementation="eager",
    )


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    # HF initialises norm weights to 1 / biases to 0; parity tests need them non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_models(s: Spec):
    """(llm, vision, projector) torch modules in ``s.dtype`` with deterministic random weights."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    cls = tf.Qwen2ForCausalLM if s.arch == "qwen2" else tf.LlamaForCausalLM
    llm = cls(llm_config(s)).eval()
    vision = tf.SiglipVisionModel(vision_config(s)).eval()
    token_order = (
        "row_major" if s.projector_type.endswith("_fix") or s.arch == "qwen2" else ("col_major")
    )
    proj = TorchProjector(s.projector_type, s.v_hidden, s.hidden, token_order).randomize_(gen)
    for m in (llm, vision):
        _randomize_norms(m, gen)
    return llm.to(s.dtype), vision.to(s.dtype), proj.to(s.dtype).eval()


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_vila(root: Path, s: Spec = Spec()) -> Path:
    """Writes a VILA-layout checkpoint to ``root`` (created) and returns it."""
    root = Path(root)
    llm, vision, proj = build_models(s)
    llm.save_pretrained(root / "llm", max_shard_size=s.max_shard_size)
    make_tokenizer(s.vocab).save_pretrained(root / "llm")
    vdir = root / "vision_tower"
    vision.save_pretrained(vdir)
    if s.siglip_prefix:
        # VILA releases were saved by transformers 4 with the ``vision_model.`` prefix.
        sd = safetensors.torch.load_file(vdir / "model.safetensors")
        safetensors.torch.save_file(
            {f"vision_model.{k}": v for k, v in sd.items()},
            vdir / "model.safetensors",
            metadata={"format": "pt"},
        )
    _dump(
        vdir / "preprocessor_config.json",
        {
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "size": {"height": s.v_image, "width": s.v_image},
            "image_processor_type": "SiglipImageProcessor",
        },
    )
    pdir = root / "mm_projector"
    pdir.mkdir()
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in proj.state_dict().items()},
        pdir / "model.safetensors",
        metadata={"format": "pt"},
    )
    dtype_name = str(s.dtype).removeprefix("torch.")
    proj_cfg = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": s.projector_type,
        "model_type": "v2l_projector",
        "torch_dtype": dtype_name,
    }
    _dump(pdir / "config.json", proj_cfg)
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": json.loads((root / "llm" / "config.json").read_text()),
        "vision_tower_cfg": json.loads((vdir / "config.json").read_text()),
        "mm_projector_cfg": proj_cfg,
        "resume_path": None,
        "hidden_size": s.hidden,
        "mm_hidden_size": s.v_hidden,
        "image_aspect_ratio": "resize",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "vision_resolution": -1,
        "interpolate_mode": "linear",
        "num_video_frames": 8,
        "fps": 0.0,
        "s2": False,
        "model_dtype": f"torch.{dtype_name}",
        "tune_language_model": True,
        "tune_vision_tower": True,
        "tune_mm_projector": True,
    }
    _dump(root / "config.json", top)
    (root / "trainer_state.json").write_text('{"global_step": 1}\n')
    return root
