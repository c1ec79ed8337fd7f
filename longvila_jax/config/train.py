"""Training-stage configuration schema: one ``StageConfig`` per ``configs/stages/*.yaml``.

A stage of the LongVILA recipe is pure config (style.md §4): where the weights come from
(``init_from``), which parameters train (regexes over '/'-joined parameter paths such as
``llm/layers/self_attn/q_proj/kernel``; everything else is frozen and has no optimizer state),
the data mixture and row shapes, the optimizer, RoPE changes (stage 4), LoRA, checkpointing and
the run directory. The same loop (``longvila_jax.train.loop``) runs every stage.

Two levels of checks, both raising ``ConfigError`` naming the dotted field, never ``assert``:

- ``__post_init__``: field-local checks (signs, ranges, mutually exclusive options);
- :func:`resolve_stage`: cross-file checks that need the model, data and mesh files (mesh sizes
  vs devices, Ulysses vs heads, sequence divisibility, batch vs data axes, trainable and LoRA
  regexes against the abstract model, data geometry vs model geometry). It only reads YAML and
  builds the model with ``nnx.eval_shape`` (no allocation, no compilation).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longvila_jax.config.base import (
    ConfigError,
    apply_overrides,
    check,
    load_config,
    load_yaml,
    to_dict,
)
from longvila_jax.config.data import DataConfig
from longvila_jax.config.model import ModelConfig
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

    def __post_init__(self):
        check(
            math.isfinite(self.lr) and self.lr > 0, "lr", f"must be finite and > 0, got {self.lr}"
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
    # Loss + batch placement (``train.objective.OBJECTIVES``): "dense" (data parallel, dense
    # attention) or "mmsp" (frames sharded for the tower, 2D zigzag tokens for the LLM).
    objective: str = "dense"

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


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with its model, data and mesh configs loaded and cross-checked."""

    stage: StageConfig
    model: ModelConfig
    data: DataConfig
    mesh: Any  # parallel.mesh.MeshConfig
    mesh_sizes: dict[str, int]
    trainable_paths: tuple[str, ...]
    frozen_paths: tuple[str, ...]
    lora_paths: tuple[str, ...]

    @property
    def micro_batch(self) -> int:
        """Global rows per micro-batch."""
        return self.global_batch // self.stage.optim.grad_accum

    @property
    def global_batch(self) -> int:
        """Rows per step: ``data.batch_size`` per data shard (``parallel.host_shards``)."""
        return self.data.batch_size * self.data_shards

    process_count: int = 1
    # Distinct row streams: processes of one sequence-parallel group share one.
    data_shards: int = 1


def load_stage(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> StageConfig:
    """Reads ``configs/stages/<stage>.yaml`` with dotted ``--set`` overrides (schema checks)."""
    return load_config(StageConfig, path, tuple(overrides))


def model_config(stage: StageConfig) -> ModelConfig:
    """The stage's model YAML with ``model_set`` and the RoPE change applied."""
    extra = stage.rope.overrides() if stage.rope else ()
    base = load_yaml(stage.model, "model")
    try:
        return apply_overrides(ModelConfig, base, (*stage.model_set, *extra))
    except ConfigError as e:
        raise e.under("model_set") if e.field else ConfigError("model", e.message) from None


def data_config(stage: StageConfig) -> DataConfig:
    """The stage's data config with ``seq_len`` and ``frames`` applied."""
    sec = stage.data
    if sec.inline is not None:
        base = to_dict(sec.inline)
        sets: tuple[str, ...] = ()
    else:
        base = load_yaml(sec.file, "data.file")
        sets = sec.set
    extra = [f"max_length={stage.seq_len}"]
    if stage.frames:
        extra.append(f"num_video_frames={stage.frames}")
    try:
        return apply_overrides(DataConfig, base, (*sets, *extra))
    except ConfigError as e:
        raise e.under("data") from None


def match_paths(patterns: tuple[str, ...], paths: list[str], field_name: str) -> set[str]:
    """Paths fully matched by any regex; raises naming the first regex that matches nothing."""
    hit: set[str] = set()
    for i, pat in enumerate(patterns):
        rx = re.compile(pat)
        found = {p for p in paths if rx.fullmatch(p)}
        check(
            bool(found),
            f"{field_name}[{i}]",
            f"regex {brief(pat)} matches no parameter (paths look like {paths[0]!r})",
        )
        hit |= found
    return hit


def resolve_stage(
    stage: StageConfig,
    *,
    mesh_path: str | None = None,
    num_devices: int,
    process_count: int = 1,
    devices_per_process: int | None = None,
    check_files: bool = True,
) -> ResolvedStage:
    """Loads and cross-checks everything a stage needs, before any compilation.

    Args:
      stage: the stage config.
      mesh_path: mesh YAML (default ``stage.mesh``; the CLI's ``--mesh`` wins).
      num_devices: devices the mesh spans (all processes).
      process_count: number of hosts; each data shard (the processes holding the same batch
        groups, ``parallel.host_shards``) reads ``data.batch_size`` rows per step.
      devices_per_process: local devices per host (Ulysses groups must fit in one).
      check_files: also require the data manifests and tokenizer to exist.

    Returns:
      A :class:`ResolvedStage`.

    Raises:
      ConfigError: naming the offending field.
    """
    from longvila_jax.parallel import mesh as mesh_lib
    from longvila_jax.parallel.axes import MESH_AXES
    from longvila_jax.parallel.host_shards import count_data_shards
    from longvila_jax.train.state import abstract_param_paths

    model = model_config(stage)
    data = data_config(stage)
    check(bool(data.datasets), "data.datasets", "the mixture lists no dataset")
    mesh_file = mesh_path or stage.mesh
    try:
        mesh_cfg = mesh_lib.load_mesh_config(mesh_file, stage.mesh_set)
    except ConfigError as e:
        raise e.under("mesh") from None
    check(
        data.row_length == stage.seq_len,
        "seq_len",
        f"must be a multiple of data.pad_multiple {data.pad_multiple}",
    )
    check(
        data.tokens_per_frame == model.tokens_per_frame,
        "data.tokens_per_frame",
        f"{data.tokens_per_frame} != the model's tokens_per_frame {model.tokens_per_frame}",
    )
    check(
        data.image_size == model.vision.image_size,
        "data.image_size",
        f"{data.image_size} != the model's vision.image_size {model.vision.image_size}",
    )
    limit = model.llm.max_position_embeddings * model.llm.rope_position_scale
    check(
        stage.seq_len <= limit,
        "seq_len",
        f"{stage.seq_len} exceeds the LLM's max_position_embeddings x scaling ({limit:g}); "
        "extend the context with rope.max_position_embeddings",
    )
    accum = stage.optim.grad_accum
    check(
        data.batch_size % accum == 0,
        "optim.grad_accum",
        f"must divide data.batch_size {data.batch_size} (rows per host per step)",
    )
    try:
        sizes = mesh_lib.validate_mesh(
            mesh_cfg,
            num_devices,
            num_heads=model.llm.num_attention_heads,
            num_kv_heads=model.llm.num_key_value_heads,
            seq_len=stage.seq_len,
            devices_per_process=devices_per_process,
        )
        try:
            shards = count_data_shards(
                sizes, MESH_AXES, mesh_cfg.activation_rules.get("batch", ()), process_count
            )
        except ValueError as e:
            raise ConfigError("activation_rules.batch", str(e)) from None
        mesh_lib.validate_mesh(mesh_cfg, num_devices, batch_size=data.batch_size * shards // accum)
    except ConfigError as e:
        raise e.under("mesh") from None
    check(
        data.sp_degree in (1, sizes["ring"] * sizes["ulysses"]),
        "data.sp_degree",
        f"must be 1 or ring*ulysses = {sizes['ring'] * sizes['ulysses']}",
    )
    if check_files:
        root = Path(data.root)
        for i, ds in enumerate(data.datasets):
            p = Path(ds.manifest)
            p = p if p.is_absolute() else root / p
            check(p.is_file(), f"data.datasets[{i}].manifest", f"{p} does not exist")
        tok = Path(data.tokenizer_dir)
        tok = tok if tok.is_absolute() else root / tok
        check(tok.is_dir(), "data.tokenizer_dir", f"{tok} does not exist")
    from longvila_jax.train.objective import OBJECTIVES

    check(stage.objective in OBJECTIVES, "objective", f"must be one of {sorted(OBJECTIVES)}")
    paths = abstract_param_paths(model)
    trainable = match_paths(stage.trainable, paths, "trainable")
    lora: set[str] = set()
    if stage.lora is not None:
        lora = match_paths(stage.lora.targets, paths, "lora.targets")
        both = sorted(lora & trainable)
        if both:
            raise ConfigError(
                "lora.targets", f"{both[0]} is also trainable; LoRA bases stay frozen"
            )
        shapes = abstract_param_paths(model, with_shapes=True)
        flat = [p for p in sorted(lora) if len(shapes[p]) < 2]
        if flat:
            raise ConfigError("lora.targets", f"{flat[0]} is not a matrix (no LoRA on vectors)")
    return ResolvedStage(
        stage=stage,
        model=model,
        data=data,
        mesh=mesh_cfg,
        mesh_sizes=sizes,
        trainable_paths=tuple(sorted(trainable)),
        frozen_paths=tuple(sorted(set(paths) - trainable)),
        lora_paths=tuple(sorted(lora)),
        process_count=process_count,
        data_shards=shards,
    )


# Stage fields a run may change when it resumes. They only affect logging, export, how (not
# what) it checkpoints, and where the run directory lives (it may be moved). Everything else
# must match the checkpoint. ``steps`` is not here: the cosine LR schedule spans ``steps``, so
# extending it would change the LR of steps already taken.
RESUME_MUTABLE = (
    "log_every",
    "tensorboard",
    "export_vila",
    "checkpoint.async_save",
    "run_dir",
    "data.inline.fail_fast",  # debugging switch: it only stops a run, never changes its rows
)


def _drop_mutable(d: Any) -> Any:
    if not isinstance(d, dict):
        return d
    d = copy.deepcopy(d)
    for dotted in RESUME_MUTABLE:
        *parents, leaf = dotted.split(".")
        node = d
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return d


# Resolved data fields that never change which rows a step sees: buffer sizes, and
# ``fail_fast`` (it only turns a skipped sample into an error; the CLI's --fail-fast sets it).
_RESOLVED_MUTABLE = ("worker_buffer_size", "read_buffer_size", "fail_fast")


def stage_fingerprint(stage: StageConfig, resolved: ResolvedStage | None = None) -> dict[str, Any]:
    """The config a resumed run must share with the checkpoint: every stage field but
    :data:`RESUME_MUTABLE` and, given ``resolved``, under ``resolved`` what the referenced
    files hold (the model and data configs, so an edited YAML under the same path counts) and
    the mesh axis sizes (so a CLI ``--mesh`` override counts too)."""
    fp = _drop_mutable(to_dict(stage))
    if resolved is not None:
        data = {k: v for k, v in to_dict(resolved.data).items() if k not in _RESOLVED_MUTABLE}
        contents = {"model": to_dict(resolved.model), "data": data, "mesh": resolved.mesh_sizes}
        fp["resolved"] = json.loads(json.dumps(contents))  # as the checkpoint meta stores it
    return fp


_MISSING = "<absent>"


def fingerprint_diff(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, saved value, current value)`` where two stage fingerprints differ,
    sorted by field; lists (e.g. ``trainable``) compare whole. :data:`RESUME_MUTABLE` fields
    are ignored (checkpoints written before a field became mutable still record it)."""
    if not prefix:
        saved, current = _drop_mutable(saved), _drop_mutable(current)
        if isinstance(saved, dict) and isinstance(current, dict) and "resolved" not in saved:
            current = {k: v for k, v in current.items() if k != "resolved"}  # older checkpoints
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [(prefix or "<stage>", saved, current)]
    out = []
    for k in sorted(set(saved) | set(current)):
        name = f"{prefix}.{k}" if prefix else k
        a, b = saved.get(k, _MISSING), current.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_diff(a, b, name))
        elif a != b:
            out.append((name, a, b))
    return out


__all__ = [
    "CheckpointConfig",
    "DataSection",
    "LoraConfig",
    "OptimConfig",
    "RESUME_MUTABLE",
    "ResolvedStage",
    "RopeConfig",
    "StageConfig",
    "data_config",
    "fingerprint_diff",
    "load_stage",
    "match_paths",
    "model_config",
    "resolve_stage",
    "stage_fingerprint",
]
