"""Model configuration schema: SigLIP tower, projector, LLM decoder and the VLM glue.

Field names follow the Hugging Face configs (``hidden_size``, ``num_key_value_heads``...) so that
``longvila_jax.ckpt`` can fill them from ``vision_tower/config.json``, ``mm_projector/config.json``
and ``llm/config.json`` with little translation. Instances live in ``configs/model/*.yaml``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from longvila_jax.config.base import ConfigError, check
from longvila_jax.core.errors import brief

DType = Literal["float32", "bfloat16", "float16"]
ProjectorType = Literal[
    "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix", "mlp2x_gelu", "linear"
]
# Rematerialisation policy of the scanned layer stacks, by name (``models.layers.REMAT_POLICIES``
# maps each to a ``jax.checkpoint`` policy; docs/architecture.md "Fast training step" says which
# to use when). A stage may override the model's choice (``StageConfig.remat``).
RematPolicy = Literal[
    "none",
    "nothing_saveable",
    "save_attention",
    "dots_with_no_batch_dims_saveable",
    "dots_saveable",
    "everything",
]
REMAT_NAMES: tuple[str, ...] = typing.get_args(RematPolicy)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision transformer: HF ``SiglipVisionConfig`` fields plus VILA's feature selection."""

    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: Literal["gelu_pytorch_tanh", "gelu"] = "gelu_pytorch_tanh"
    # VILA's mm_vision_select_layer: index into HF ``hidden_states`` (L + 1 entries).
    select_layer: int = -2

    def __post_init__(self):
        for name in ("image_size", "patch_size", "num_channels", "hidden_size"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.image_size >= self.patch_size, "image_size", "must be >= patch_size")
        check(self.num_hidden_layers > 0, "num_hidden_layers", "must be positive")
        check(self.num_attention_heads > 0, "num_attention_heads", "must be positive")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size {self.hidden_size}",
        )
        check(
            -(self.num_hidden_layers + 1) <= self.select_layer <= self.num_hidden_layers,
            "select_layer",
            f"must index hidden_states of a {self.num_hidden_layers}-layer tower",
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: ``hidden_states[select_layer]`` needs no more."""
        s = self.select_layer
        return s if s >= 0 else self.num_hidden_layers + 1 + s


@dataclass(frozen=True)
class ProjectorConfig:
    """VILA multimodal projector (``mm_projector/config.json``: ``mm_projector_type``)."""

    type: ProjectorType = "mlp_downsample"
    # Order of the merged blocks in the output sequence: Aug-2024 code (Llama-3-LongVILA-8B,
    # VILA1.5) emits them column-major, NVILA-era code (Qwen2 LongVILA, *_fix) row-major.
    token_order: Literal["row_major", "col_major"] = "row_major"
    layer_norm_eps: float = 1e-5

    @property
    def merge(self) -> int:
        """Side of the square patch neighbourhood merged into one token (1 = no merge)."""
        return {"mlp_downsample_3x3_fix": 3, "mlp2x_gelu": 1, "linear": 1}.get(self.type, 2)


@dataclass(frozen=True)
class RopeScaling:
    """HF ``rope_scaling``; only linear position interpolation is used by LongVILA releases."""

    type: Literal["linear"] = "linear"
    factor: float = 1.0

    def __post_init__(self):
        check(self.factor >= 1.0, "factor", f"must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class LLMConfig:
    """Decoder-only LLM: Llama (Llama-3) or Qwen2 (q/k/v bias)."""

    arch: Literal["llama", "qwen2"] = "qwen2"
    vocab_size: int = 151648
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Qwen2: bias on q/k/v only. Llama ``attention_bias``: bias on q/k/v/o.
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: Literal["silu"] = "silu"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.num_attention_heads > 0, "num_attention_heads", "must be positive")
        check(self.num_key_value_heads > 0, "num_key_value_heads", "must be positive")
        check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads {self.num_attention_heads}",
        )
        if self.head_dim is None:
            check(
                self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"must divide hidden_size {self.hidden_size} when head_dim is not set",
            )
        else:
            check(self.head_dim > 0, "head_dim", "must be positive")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_position_scale(self) -> float:
        """Positions are divided by this before RoPE (HF linear scaling)."""
        return self.rope_scaling.factor if self.rope_scaling else 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The whole LongVILA VLM plus its numerics policy."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Tokenizer id of the ``<image>`` placeholder. It may lie beyond the embedding table
    # (media tokens are added to the tokenizer, not to the LLM vocabulary), so it is never gathered.
    image_token_id: int = 151649
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: RematPolicy = "nothing_saveable"

    def __post_init__(self):
        check(self.image_token_id >= 0, "image_token_id", "must be >= 0")
        # YAML loads check the Literal; this also covers configs built in Python.
        check(
            self.remat in REMAT_NAMES,
            "remat",
            f"must be one of {list(REMAT_NAMES)}, got {brief(self.remat)}",
        )
        if self.projector.type == "mlp_downsample_3x3_fix":
            # Intermediate width is 3 x mm_hidden_size in NVILA's projector.
            check(self.vision.hidden_size > 0, "vision.hidden_size", "must be positive")

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame after the projector (196 for SigLIP-384 + 2x2 merge)."""
        m = self.projector.merge
        return (-(-self.vision.patches_per_side // m)) ** 2  # exact integer ceil


__all__ = [
    "ConfigError",
    "LLMConfig",
    "ModelConfig",
    "ProjectorConfig",
    "REMAT_NAMES",
    "RematPolicy",
    "RopeScaling",
    "VisionConfig",
]
