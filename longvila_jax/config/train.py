"""Training-stage configuration schema: one ``StageConfig`` per ``configs/stages/*.yaml``.

A stage of the LongVILA recipe is pure config (style.md §4): where the weights come from
(``init_from``), which parameters train (regexes over '/'-joined parameter paths such as
``llm/layers/self_attn/q_proj/kernel``; everything else is frozen and has no optimizer state),
the data mixture and row shapes, the optimizer, RoPE changes (stage 4), LoRA, checkpointing and
the run directory. The same loop (``longvila_jax.train.loop``) runs every stage.

This module is only the schema: ``__post_init__`` checks each field on its own (signs, ranges,
mutually exclusive options) and raises ``ConfigError`` naming the dotted field, never
``assert``. The checks across files (model, data and mesh against each other and the devices)
are ``longvila_jax.train.resolve``; the resume fingerprint is ``longvila_jax.train.fingerprint``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from longvila_jax.config.base import (
    ConfigError,
    check,
    load_config,
)
from longvila_jax.config.data import DataConfig
from longvila_jax.config.model import REMAT_NAMES, DType, RematPolicy
from longvila_jax.core.errors import brief

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def _check_regexes(patterns: tuple[str, ...], name: str) -> None:
    for i, pat in enumerate(patterns):
        try:
            re.compile(pat)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            # OverflowError: a{4294967296}; RecursionError: thousands of nested groups.
            msg = f"invalid regex {brief(pat)}: {type(e).__name__}: {brief(str(e))}"
            raise ConfigError(f"{name}[{i}]", msg) from None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay (or a constant LR), clipping, accumulation.

    ``grad_accum`` micro-batches are accumulated inside one jitted step; the loss is the token
    mean over all of them (sum of CE / number of supervised tokens).
    """

    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    # Fraction of ``steps`` used for warmup (VILA's warmup_ratio); exclusive with warmup_steps.
    warmup_ratio: float = 0.0
    end_lr_ratio: float = 0.0  # cosine end value as a fraction of lr
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    # Peak LRs of the vision tower and the projector (upstream's ``vision_tower_lr`` /
    # ``mm_projector_lr`` parameter groups, ``llava/train/llava_trainer.py``); null = ``lr``.
    # They follow the same warmup and decay, scaled by their ratio to ``lr``.
    vision_tower_lr: float | None = None
    mm_projector_lr: float | None = None

    def __post_init__(self):
        check(
            math.isfinite(self.lr) and self.lr > 0, "lr", f"must be finite and > 0, got {self.lr}"
        )
        for name in ("vision_tower_lr", "mm_projector_lr"):
            value = getattr(self, name)
            check(
                value is None or (math.isfinite(value) and value >= 0),
                name,
                f"must be finite and >= 0 (0 freezes the module's updates) or null, got {value}",
            )
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must lie in [0, 1)")
        check(
            not (self.warmup_steps and self.warmup_ratio),
            "warmup_ratio",
            "set either warmup_steps or warmup_ratio, not both",
        )
        check(0.0 <= self.end_lr_ratio <= 1.0, "end_lr_ratio", "must lie in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 <= self.b1 < 1.0, "b1", "must lie in [0, 1)")
        check(0.0 <= self.b2 < 1.0, "b2", "must lie in [0, 1)")
        check(self.eps > 0, "eps", "must be > 0")
        check(
            self.clip_norm is None or (math.isfinite(self.clip_norm) and self.clip_norm > 0),
            "clip_norm",
            "must be > 0 or null",
        )
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")

    def warmup(self, steps: int) -> int:
        """Warmup length in steps for a stage of ``steps`` steps."""
        return self.warmup_steps or int(math.ceil(self.warmup_ratio * steps))


@dataclass(frozen=True)
class PrecisionConfig:
    """Dtypes of one stage, as upstream trains (DeepSpeed bf16 + ZeRO keeps fp32 masters).

    ``params`` is the dtype of the trainable parameters (the masters the optimizer updates) and
    of the AdamW moments; ``compute`` the dtype of the forward and backward (null: the model
    config's ``compute_dtype``); ``frozen`` the dtype frozen parameters are kept in (null: the
    model config's ``param_dtype``). Gradients always accumulate in float32. The defaults are
    upstream's: fp32 masters and moments whatever dtype the weights are stored in.
    """

    params: DType = "float32"
    compute: DType | None = None
    frozen: DType | None = None


@dataclass(frozen=True)
class UpstreamRecipe:
    """What the upstream script this stage ports does per optimizer step (checked by the dry
    run: ``python -m longvila_jax.train --dry-run``)."""

    samples_per_step: float  # per-device batch x DP x grad-acc of the upstream script
    lr: float  # the upstream learning rate
    script: str  # the upstream file the figures come from (NVlabs/VILA path)

    def __post_init__(self):
        check(
            math.isfinite(self.samples_per_step) and self.samples_per_step > 0,
            "samples_per_step",
            "must be finite and > 0",
        )
        check(math.isfinite(self.lr) and self.lr > 0, "lr", "must be finite and > 0")
        check(bool(self.script), "script", "must name the upstream file")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE changes applied to the LLM config of the loaded model (context extension)."""

    theta: float | None = None
    # HF linear scaling factor (positions / factor); 1.0 removes scaling.
    scaling_factor: float | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self):
        check(self.theta is None or self.theta > 0, "theta", "must be > 0")
        check(
            self.scaling_factor is None or self.scaling_factor >= 1.0,
            "scaling_factor",
            "must be >= 1",
        )
        check(
            self.max_position_embeddings is None or self.max_position_embeddings > 0,
            "max_position_embeddings",
            "must be > 0",
        )

    def overrides(self) -> tuple[str, ...]:
        """Dotted ``ModelConfig`` overrides implementing this change."""
        out = []
        if self.theta is not None:
            out.append(f"llm.rope_theta={self.theta!r}")
        if self.scaling_factor is not None:
            out.append(
                "llm.rope_scaling=null"
                if self.scaling_factor == 1.0
                else f"llm.rope_scaling={{type: linear, factor: {self.scaling_factor!r}}}"
            )
        if self.max_position_embeddings is not None:
            out.append(f"llm.max_position_embeddings={self.max_position_embeddings}")
        return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters ``W + (alpha / rank) * A @ B`` on kernels matching ``targets``.

    The base kernels stay frozen (they must not match ``trainable``); adapters are merged into
    the kernels when the stage writes its final checkpoint.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        check(self.rank >= 1, "rank", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(len(self.targets) > 0, "targets", "must list at least one regex")
        _check_regexes(self.targets, "targets")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of the whole train state, the data iterator and metadata."""

    every: int = 100
    keep: int = 2  # >= 2 so retention never deletes the last good checkpoint while saving
    async_save: bool = True

    def __post_init__(self):
        check(self.every >= 1, "every", "must be >= 1")
        check(self.keep >= 2, "keep", "must be >= 2 (the last good checkpoint is never deleted)")


@dataclass(frozen=True)
class DataSection:
    """The stage's data: a ``configs/data`` YAML plus dotted overrides, or an inline config."""

    file: str = ""
    set: tuple[str, ...] = ()
    inline: DataConfig | None = None

    def __post_init__(self):
        check(
            bool(self.file) != (self.inline is not None),
            "file",
            "give exactly one of data.file and data.inline",
        )
        check(not (self.set and self.inline is not None), "set", "overrides need data.file")


@dataclass(frozen=True)
class StageConfig:
    """One stage of the training pipeline (the schema of ``configs/stages/*.yaml``).

    ``init_from`` forms:
      - ``random``: random init of ``model`` (tests and the tiny demo);
      - ``stage:<name>``: the final checkpoint of stage ``<name>`` of the same pipeline, i.e.
        ``<parent of run_dir>/<name>/final``;
      - ``hf:<llm_dir>|<vision_dir>``: a plain HF Llama/Qwen2 + SigLIP and a new projector of
        type ``model.projector.type`` (stage 1);
      - any other string: a VILA-layout directory or a project checkpoint.
    """

    name: str
    model: str  # model YAML: random init, and the abstract model for checks before compile
    init_from: str
    trainable: tuple[str, ...]
    data: DataSection
    seq_len: int  # expanded row length (visual + text tokens); sets data.max_length
    steps: int
    run_dir: str
    mesh: str = "configs/mesh/cpu8_r2u4.yaml"
    mesh_set: tuple[str, ...] = ()  # dotted MeshConfig overrides
    model_set: tuple[str, ...] = ()  # dotted ModelConfig overrides
    frames: int = 0  # frames per video (data.num_video_frames); 0 keeps the data config's
    optim: OptimConfig = field(default_factory=OptimConfig)
    rope: RopeConfig | None = None
    lora: LoraConfig | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    max_consecutive_nonfinite: int = 3  # K non-finite steps in a row halt the run
    log_every: int = 1
    tensorboard: bool = True
    export_vila: bool = False  # write <run_dir>/vila (VILA layout) after the final checkpoint
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # The upstream figures this stage must reach (real stages; null for the demo and tests).
    upstream: UpstreamRecipe | None = None
    # Loss + batch placement (``train.objective.OBJECTIVES``): "dense" (data parallel, dense
    # attention) or "mmsp" (frames sharded for the tower, 2D zigzag tokens for the LLM).
    objective: Literal["dense", "mmsp"] = "dense"
    # Rematerialisation of the scanned layers (``models.layers.REMAT_POLICIES``), overriding the
    # model config's ``remat`` (null: keep the model's, or the init checkpoint's). It changes
    # memory and speed, never the numbers, so a run may resume with another (RESUME_MUTABLE).
    remat: RematPolicy | None = None

    def __post_init__(self):
        check(bool(_NAME_RE.match(self.name)), "name", f"must match {_NAME_RE.pattern}")
        check(bool(self.model), "model", "must name a model YAML")
        check(bool(self.init_from), "init_from", "must be non-empty")
        if self.init_from.startswith("stage:"):
            prev = self.init_from[len("stage:") :]
            check(bool(_NAME_RE.match(prev)), "init_from", f"bad stage name {brief(prev)}")
            check(prev != self.name, "init_from", "a stage cannot start from itself")
        if self.init_from.startswith("hf:"):
            parts = self.init_from[3:].split("|")
            check(
                len(parts) == 2 and all(parts),
                "init_from",
                "hf form is hf:<llm_dir>|<vision_dir>",
            )
        check(len(self.trainable) > 0, "trainable", "must list at least one regex")
        _check_regexes(self.trainable, "trainable")
        check(self.seq_len > 0, "seq_len", "must be > 0")
        check(self.steps > 0, "steps", "must be > 0")
        check(self.frames >= 0, "frames", "must be >= 0")
        check(bool(self.run_dir), "run_dir", "must be non-empty")
        check(bool(self.mesh), "mesh", "must name a mesh YAML")
        check(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(
            self.remat is None or self.remat in REMAT_NAMES,
            "remat",
            f"must be one of {list(REMAT_NAMES)} or null, got {brief(self.remat)}",
        )


def load_stage(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> StageConfig:
    """Reads ``configs/stages/<stage>.yaml`` with dotted ``--set`` overrides (schema checks)."""
    return load_config(StageConfig, path, tuple(overrides))


__all__ = [
    "CheckpointConfig",
    "DataSection",
    "LoraConfig",
    "OptimConfig",
    "PrecisionConfig",
    "RopeConfig",
    "StageConfig",
    "UpstreamRecipe",
    "load_stage",
]
