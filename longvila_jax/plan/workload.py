"""What is being trained: model, row shapes, batch and dtypes, from a stage or from flags.

A :class:`Workload` is the planner's input apart from the cluster. From a stage
(``Workload.from_stage``) it reuses the trainer's own resolution: the stage's model with its
overrides (``train.resolve.model_config``), the data config's row geometry, the global batch
and the dtype policy (``train.precision.DtypePolicy``); parameter counts and per-device
parameter + optimizer bytes come from ``train.dry_run.param_bytes`` (one formula for the dry
run and the planner).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from longvila_jax.config.base import check
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import DataSection, PrecisionConfig, StageConfig
from longvila_jax.core.axes import MESH_AXES
from longvila_jax.parallel.mesh import MeshConfig
from longvila_jax.train import dry_run
from longvila_jax.train.precision import DtypePolicy
from longvila_jax.train.resolve import ResolvedStage, data_config, match_paths, model_config
from longvila_jax.train.state import ModelTemplate


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameters of one candidate mesh, elements.

    Attributes:
      trainable, frozen: held by one device (after the mesh's ``param_rules`` shard them).
      total, trainable_total: unsharded.
      whole_trainable: the part of ``trainable`` that no rule splits (every device holds it
        whole, e.g. SigLIP's 1152-wide tensors over 256 devices).
    """

    trainable: float
    frozen: float
    total: float
    trainable_total: float
    whole_trainable: float = 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """The training job the planner places.

    Attributes:
      name: the stage's name (or "custom").
      model: the model config (its ``remat`` is the stage's; the planner varies it).
      seq_len: tokens per packed row L; frames: frame slots per row F.
      global_rows: rows per optimizer step, or None: one row per batch group (throughput
        planning, no fixed batch).
      policy: the dtype policy; trainable: parameter-path regexes; lora: the stage's LoRA.
      param_rules: logical -> mesh axes of the parameters (the mesh files' default).
    """

    name: str
    model: ModelConfig
    seq_len: int
    frames: int
    global_rows: int | None
    policy: DtypePolicy
    trainable: tuple[str, ...] = (".*",)
    stage: StageConfig | None = None
    param_rules: dict = dataclasses.field(default_factory=lambda: MeshConfig().param_rules)

    def __post_init__(self):
        check(self.seq_len >= 1, "seq_len", "must be >= 1")
        check(self.frames >= 0, "frames", "must be >= 0")
        check(self.global_rows is None or self.global_rows >= 1, "global_rows", "must be >= 1")

    @classmethod
    def from_stage(cls, stage: StageConfig, global_rows: int | None = None) -> Workload:
        """A stage's workload: its model (with overrides), seq_len, frame slots per row
        (``data.max_frames_per_row`` as the MM-SP objective lays them out), global batch
        (``data.batch_size`` rows per data shard; one shard, as for one SP group over every
        device, unless ``global_rows`` says otherwise) and dtype policy."""
        model = model_config(stage)
        data = data_config(stage)
        rows = global_rows if global_rows is not None else data.batch_size
        return cls(
            name=stage.name,
            model=model,
            seq_len=stage.seq_len,
            frames=data.max_frames_per_row,
            global_rows=rows,
            policy=DtypePolicy.of(stage.precision, model),
            trainable=tuple(stage.trainable),
            stage=stage,
        )

    @classmethod
    def custom(
        cls,
        model: ModelConfig,
        *,
        seq_len: int,
        frames: int,
        global_rows: int | None = None,
        precision: PrecisionConfig | None = None,
    ) -> Workload:
        """A workload from flags: every parameter trains, the default dtype policy."""
        policy = DtypePolicy.of(precision or PrecisionConfig(), model)
        return cls("custom", model, seq_len, frames, global_rows, policy)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.policy.compute in ("bfloat16", "float16") else 4

    @property
    def frozen_bytes(self) -> int:
        return 2 if self.policy.frozen in ("bfloat16", "float16") else 4

    def params(self, sizes: dict[str, int], param_rules: dict | None = None) -> ParamCounts:
        """Parameter counts for mesh ``sizes`` and ``param_rules`` (default the workload's),
        from ``train.dry_run.param_bytes``."""
        rules = self.param_rules if param_rules is None else param_rules
        groups = {tuple(v) for v in rules.values() if v}
        if len(groups) == 1:
            # Every rule shards over the same axes: only their product matters (the mesh splits
            # a dimension over it or leaves it whole), so count on one fsdp axis of that size.
            shards = math.prod(sizes[a] for a in next(iter(groups)))
            canon = {k: ("fsdp",) if v else () for k, v in rules.items()}
            key = tuple(shards if a == "fsdp" else 1 for a in MESH_AXES)
            return _param_counts(self, key, tuple(sorted(canon.items())))
        used = {a for axes in rules.values() for a in axes}
        key = tuple(sizes[a] if a in used else 1 for a in MESH_AXES)
        return _param_counts(self, key, tuple(sorted((k, tuple(v)) for k, v in rules.items())))


@functools.lru_cache(maxsize=256)
def _template(model: ModelConfig) -> ModelTemplate:
    return ModelTemplate.build(model)


@functools.lru_cache(maxsize=1024)
def _param_counts(work: Workload, key: tuple[int, ...], rules: tuple) -> ParamCounts:
    sizes = dict(zip(MESH_AXES, key, strict=True))
    template = _template(work.model)
    paths = list(template.names)
    trainable = match_paths(work.trainable, paths, "trainable")
    stage = work.stage or StageConfig(
        name="plan",
        model="unused",
        init_from="random",
        trainable=work.trainable,
        data=DataSection(file="unused"),
        seq_len=work.seq_len,
        steps=1,
        run_dir="unused",
    )
    mesh_cfg = MeshConfig(**sizes, param_rules={k: tuple(v) for k, v in rules})
    resolved = ResolvedStage(
        stage=stage,
        model=work.model,
        data=None,
        mesh=mesh_cfg,
        mesh_sizes=sizes,
        trainable_paths=tuple(sorted(trainable)),
        frozen_paths=tuple(sorted(set(paths) - trainable)),
        lora_paths=(),
    )
    if stage.lora is not None:
        lora = match_paths(stage.lora.targets, paths, "lora.targets")
        resolved = dataclasses.replace(resolved, lora_paths=tuple(sorted(lora)))
    report = dry_run.param_bytes(resolved, work.policy)
    per_device = report["bytes_per_device"]
    moving = per_device["optimizer"] / 8 if work.policy.params == "float32" else 0.0
    if work.policy.params != "float32":
        moving = per_device["optimizer"] / (2 * _width(work.policy.params))
    frozen = (per_device["params"] - moving * _width(work.policy.params)) / _width(
        work.policy.frozen
    )
    total = sum(math.prod(s.shape) for s in template.shapes.values())
    return ParamCounts(
        moving, frozen, total, report["trainable_params"], report["whole_trainable_params"]
    )


def _width(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


__all__ = ["ParamCounts", "Workload"]
