"""Resolving a stage: its model, data and mesh files loaded and checked against each other.

``resolve_stage`` runs every check that needs more than one file before anything compiles:
mesh sizes against the devices, Ulysses against the heads, sequence divisibility, batch against
the data axes, the trainable and LoRA regexes against the abstract model, the data geometry
against the model geometry. It reads YAML and builds the model with ``nnx.eval_shape`` only (no
allocation, no compilation), and raises ``ConfigError`` naming the dotted field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longvila_jax.config.base import ConfigError, apply_overrides, check, load_yaml, to_dict
from longvila_jax.config.data import DataConfig
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import StageConfig
from longvila_jax.core.axes import MESH_AXES
from longvila_jax.core.errors import brief
from longvila_jax.parallel import mesh as mesh_lib
from longvila_jax.parallel.host_shards import count_data_shards
from longvila_jax.train.state import abstract_param_paths


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


def model_overrides(stage: StageConfig) -> tuple[str, ...]:
    """Dotted ``ModelConfig`` overrides a stage applies to its model, whether the model comes
    from the YAML or from the init checkpoint: ``model_set``, the RoPE change, and the stage's
    ``remat`` (last, so it wins over a ``remat=`` in ``model_set``)."""
    rope = stage.rope.overrides() if stage.rope else ()
    remat = (f"remat={stage.remat}",) if stage.remat is not None else ()
    return (*stage.model_set, *rope, *remat)


def model_config(stage: StageConfig) -> ModelConfig:
    """The stage's model YAML with :func:`model_overrides` applied."""
    base = load_yaml(stage.model, "model")
    try:
        return apply_overrides(ModelConfig, base, model_overrides(stage))
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


def planned_devices(stage: StageConfig, mesh_path: str | None = None) -> int | None:
    """The device count a stage's mesh is written for: the product of its axis sizes (the mesh
    file with ``mesh_set``), or None when an axis is -1 (it fills whatever devices there are).

    A run checks the mesh against the devices it finds (``resolve_stage(num_devices=...)``); the
    dry run (``train.dry_run``) checks it against this planned count instead, so a 256-GPU
    stage resolves on a laptop.

    Raises:
      ConfigError: the mesh file or ``mesh_set`` is malformed (field under ``mesh``).
    """
    try:
        cfg = mesh_lib.load_mesh_config(mesh_path or stage.mesh, stage.mesh_set)
    except ConfigError as e:
        raise e.under("mesh") from None
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    return None if -1 in sizes else math.prod(sizes)


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
      num_devices: devices the mesh spans (all processes): the devices present for a run, the
        planned count (``planned_devices``) for the dry run.
      process_count: number of hosts; each data shard (the processes holding the same batch
        groups, ``parallel.host_shards``) reads ``data.batch_size`` rows per step.
      devices_per_process: local devices per host (Ulysses groups must fit in one).
      check_files: also require the data manifests and tokenizer to exist.

    Returns:
      A :class:`ResolvedStage`.

    Raises:
      ConfigError: naming the offending field.
    """

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


__all__ = [
    "ResolvedStage",
    "data_config",
    "match_paths",
    "model_config",
    "model_overrides",
    "planned_devices",
    "resolve_stage",
]
