"""Where a stage starts: its initial checkpoint, the model it trains and its first train state.

``init_from`` names the start: ``random``, ``stage:<name>`` (a finished stage's ``final/``), a
project checkpoint directory, a VILA checkpoint directory or ``hf:<llm>|<vision>``. The last two
are imported once into ``<run_dir>/init``. Every project checkpoint is verified against its
integrity manifest before use, and its parameter tree must match the stage's model YAML.

:class:`StateLayout` is the train state's shape and placement, known before any array exists:
the loop restores a checkpoint into it or builds a fresh state with it (:meth:`StateLayout.fresh`).

Dtypes (``train.precision``): parameters are loaded in the model's ``param_dtype`` (as
stored), then the state holds the trainable ones and the LoRA adapters as fp32 masters
(``precision.params``) and the frozen ones in ``precision.frozen``; :func:`forward_template`
is the model the step builds, computing in ``precision.compute``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from longvila_jax.ckpt import orbax_io, vila_import
from longvila_jax.ckpt.checks import check_stored_params
from longvila_jax.ckpt.hf_parts_import import import_hf_parts
from longvila_jax.config.base import ConfigError
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import StageConfig
from longvila_jax.models.vlm import LongVILA
from longvila_jax.train.finish import FINAL_DIR, barrier
from longvila_jax.train.precision import DtypePolicy, forward_config
from longvila_jax.train.resolve import ResolvedStage, model_overrides
from longvila_jax.train.state import (
    ModelTemplate,
    abstract_param_paths,
    create_state,
    flatten_model,
    init_lora,
    nest,
    state_shardings,
    unnest,
)

INIT_DIR = "init"  # <run_dir>/init: a VILA or HF start imported into the project layout


def init_source(stage: StageConfig) -> tuple[str, Any]:
    """Classifies ``init_from``.

    Returns:
      ``("random", None)``, ``("stage", final dir)``, ``("hf", (llm dir, vision dir))`` or
      ``("path", dir)``.
    """
    source = stage.init_from
    if source == "random":
        return "random", None
    if source.startswith("stage:"):
        return "stage", Path(stage.run_dir).parent / source[len("stage:") :] / FINAL_DIR
    if source.startswith("hf:"):
        llm, vision = source[3:].split("|")
        return "hf", (Path(llm), Path(vision))
    return "path", Path(source)


def prepare_init(resolved: ResolvedStage, run_dir: Path, primary: bool) -> Path | None:
    """The project checkpoint the stage starts from (imported into ``run_dir/init`` if needed).

    Args:
      resolved: the resolved stage.
      run_dir: the stage's run directory.
      primary: this process imports (the others wait at a barrier, then verify).

    Returns:
      None for a random init, else a verified project checkpoint directory.

    Raises:
      ConfigError: ``init_from`` names nothing usable.
      CheckpointError: the checkpoint does not match its integrity manifest.
    """
    kind, value = init_source(resolved.stage)
    if kind == "random":
        return None
    target = run_dir / INIT_DIR
    if kind in ("stage", "path") and orbax_io.is_project_checkpoint(value):
        orbax_io.verify_checkpoint(value)  # a tampered or damaged start is refused, named
        return value
    if kind == "stage":
        raise ConfigError("init_from", f"{value} is not a finished stage (no project checkpoint)")
    # An import interrupted by a kill leaves no ``init/`` (it is written under a temporary name
    # and renamed), so an existing one is complete and a relaunch reuses it.
    if not target.exists() and primary:
        if kind == "hf":
            llm, vision = value
            import_hf_parts(
                llm,
                vision,
                target,
                projector_type=resolved.model.projector.type,
                seed=resolved.stage.seed,
            )
        elif (value / "config.json").is_file():
            vila_import.import_vila(value, target)
        else:
            raise ConfigError(
                "init_from", f"{value} is neither a project checkpoint nor a VILA dir"
            )
    barrier("init-import")
    orbax_io.verify_checkpoint(target)
    return target


def runtime_model(resolved: ResolvedStage, init_ckpt: Path | None) -> ModelConfig:
    """The model actually trained: the checkpoint's config + ``model_set``, RoPE changes and the
    stage's ``remat`` (``resolve.model_overrides``).

    Raises:
      ConfigError: the checkpoint's parameter tree differs from the stage's model YAML.
    """
    if init_ckpt is None:
        return resolved.model
    stage = resolved.stage
    cfg = orbax_io.read_model_config(init_ckpt, model_overrides(stage))
    stored = abstract_param_paths(cfg, with_shapes=True)
    wanted = abstract_param_paths(resolved.model, with_shapes=True)
    if stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ConfigError(
            "model",
            f"{init_ckpt} holds a different model than {stage.model}: {diff[0]} is "
            f"{stored.get(diff[0])} there and {wanted.get(diff[0])} in the YAML",
        )
    return cfg


def forward_template(resolved: ResolvedStage) -> ModelTemplate:
    """The template of the model the train step builds: ``resolved.model`` computing in the
    stage's compute dtype (``precision.compute``, null: the model's own ``compute_dtype``).

    Its parameter shapes and dtypes are the model config's (``param_dtype``); the step casts
    the state's parameters to the compute dtype before merging them into it.
    """
    policy = DtypePolicy.of(resolved.stage.precision, resolved.model)
    return ModelTemplate.build(forward_config(resolved.model, policy))


def initial_params(
    cfg: ModelConfig,
    init_ckpt: Path | None,
    template: ModelTemplate,
    shardings: dict[str, Any],
    seed: int,
) -> dict[str, jax.Array]:
    """Flat params (``template.names`` -> array) placed with ``shardings``.

    Args:
      cfg: the model config.
      init_ckpt: the project checkpoint to load, or None for a random init seeded by ``seed``.
      template: the model template.
      shardings: parameter path -> sharding.
      seed: the random init's seed.
    """
    if init_ckpt is None:

        def make():
            # The model is built inside jit, so each parameter is created directly with its
            # out_sharding instead of whole on one device first.
            with nnx.use_eager_sharding(False):
                return flatten_model(LongVILA(cfg, rngs=nnx.Rngs(seed)))

        return jax.jit(make, out_shardings=shardings)()
    # Every stored parameter, its shape and dtype against the model (CheckpointError naming
    # it); prepare_init has verified the manifest, so the load does not hash the files again.
    check_stored_params(cfg, orbax_io.stored_tree(init_ckpt), init_ckpt)
    flat = unnest(
        orbax_io.load_params(
            init_ckpt, dtype=cfg.param_dtype, shardings=nest(shardings), verify=False
        )
    )
    return {name: flat[name] for name in template.names}


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state's structure and shardings (``train.state`` layout), without arrays.

    Attributes:
      abstract: the state as a tree of ``ShapeDtypeStruct``.
      shardings: the same tree of ``NamedSharding`` (the jitted step's in/out shardings).
      build: ``(flat params, LoRA adapters or None, rng uint32[2]) -> state``.
    """

    abstract: Any
    shardings: Any
    build: Callable[..., dict]

    @classmethod
    def of(
        cls,
        resolved: ResolvedStage,
        template: ModelTemplate,
        optimizer: optax.GradientTransformation,
        param_shardings: dict[str, Any],
        mesh: Mesh,
    ) -> StateLayout:
        """The layout of ``resolved``'s train state (traced abstractly: nothing is allocated)."""
        stage = resolved.stage
        trainable = set(resolved.trainable_paths)
        policy = DtypePolicy.of(stage.precision, resolved.model)

        def build(params, lora, rng):
            return create_state(params, trainable, optimizer, lora=lora, rng=rng, policy=policy)

        abstract_lora = None
        if stage.lora:
            abstract_lora = jax.eval_shape(
                lambda: init_lora(
                    template.shapes, resolved.lora_paths, stage.lora.rank, jax.random.key(0)
                )
            )
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        abstract = jax.eval_shape(build, dict(template.shapes), abstract_lora, rng)
        shardings = state_shardings(abstract, param_shardings, mesh, optimizer)
        return cls(abstract, shardings, build)

    def restore_target(self) -> Any:
        """The tree Orbax restores into: each leaf's shape, dtype and sharding."""
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            self.abstract,
            self.shardings,
        )

    def fresh(
        self,
        resolved: ResolvedStage,
        template: ModelTemplate,
        init_ckpt: Path | None,
        param_shardings: dict[str, Any],
    ) -> dict:
        """The state at step 0: initial params, LoRA adapters (B = 0) and the RNG, all from
        ``stage.seed`` (the same seed gives the same state bit for bit)."""
        stage = resolved.stage
        key = jax.random.key(stage.seed)
        params = initial_params(resolved.model, init_ckpt, template, param_shardings, stage.seed)
        lora = None
        if stage.lora:
            lora = init_lora(template.shapes, resolved.lora_paths, stage.lora.rank, key)
        rng = jax.random.key_data(jax.random.fold_in(key, 1)).astype(jnp.uint32)
        return jax.jit(self.build, out_shardings=self.shardings)(params, lora, rng)


__all__ = [
    "INIT_DIR",
    "StateLayout",
    "forward_template",
    "init_source",
    "initial_params",
    "prepare_init",
    "runtime_model",
]
