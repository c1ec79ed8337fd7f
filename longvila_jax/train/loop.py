"""The stage-agnostic training loop: resolve, initialise or resume, train, checkpoint, finish.

Order of a run (every check that can fail on config happens before anything compiles):

1. ``multihost.initialize``; ``resolve_stage`` cross-checks stage, model, data and mesh files.
2. Resolve ``init_from`` to a project checkpoint (importing HF/VILA layouts into
   ``<run_dir>/init`` once), build the model template and shardings.
3. If ``<run_dir>/checkpoints`` has a committed step, restore state, data iterator and meta from
   the newest one that matches its integrity manifest (older ones are tried when it does not;
   all corrupt raises), refusing a different stage config; else initialise the state.
4. Jit the step with explicit shardings, compile it ahead of time (memory analysis logged).
5. Train: host batch -> objective -> step -> metrics; checkpoint every ``checkpoint.every``
   steps; SIGTERM saves the current step and exits with :data:`EXIT_PREEMPTED`;
   ``max_consecutive_nonfinite`` skipped steps in a row exit with :data:`EXIT_NONFINITE`.
6. Write the final project checkpoint ``<run_dir>/final`` (LoRA merged) for the next stage's
   ``stage:<name>``; optionally export it to the VILA layout (``<run_dir>/vila``)
   (:mod:`longvila_jax.train.finish`, which also lists the kill points of that phase).
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.config.base import ConfigError, save_yaml
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import StageConfig
from longvila_jax.train import finish, multihost
from longvila_jax.train.checkpoint import (
    Checkpointer,
    CorruptCheckpoints,
    KillSwitch,
    NonFiniteState,
)
from longvila_jax.train.fingerprint import check_resume_config, stage_fingerprint
from longvila_jax.train.finish import FINAL_DIR, VILA_DIR, barrier, write_final
from longvila_jax.train.metrics import MetricsWriter, batch_fingerprint, float_bits, sample_ids
from longvila_jax.train.objective import OBJECTIVES
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.resolve import ResolvedStage, match_paths, resolve_stage
from longvila_jax.train.state import (
    ModelTemplate,
    create_state,
    flatten_model,
    init_lora,
    model_params,
    nest,
    unnest,
)
from longvila_jax.train.step import jit_step, make_train_step

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to continue

INIT_DIR = "init"


def init_source(stage: StageConfig) -> tuple[str, Any]:
    """Classifies ``init_from``: ("random", None), ("stage", path), ("hf", (llm, vision)) or
    ("path", path)."""
    src = stage.init_from
    if src == "random":
        return "random", None
    if src.startswith("stage:"):
        return "stage", Path(stage.run_dir).parent / src[len("stage:") :] / FINAL_DIR
    if src.startswith("hf:"):
        llm, vision = src[3:].split("|")
        return "hf", (Path(llm), Path(vision))
    return "path", Path(src)


def prepare_init(resolved: ResolvedStage, run_dir: Path, primary: bool) -> Path | None:
    """The project checkpoint the stage starts from (imported into ``run_dir/init`` if needed).

    Returns:
      None for a random init, else a project checkpoint directory.

    Raises:
      ConfigError: ``init_from`` names nothing usable.
    """
    from longvila_jax.ckpt import orbax_io

    kind, value = init_source(resolved.stage)
    if kind == "random":
        return None
    target = run_dir / INIT_DIR
    if kind in ("stage", "path") and orbax_io.is_project_checkpoint(value):
        orbax_io.verify_checkpoint(value)  # a tampered or damaged start is refused, named
        return value
    if kind == "stage":
        raise ConfigError("init_from", f"{value} is not a finished stage (no project checkpoint)")
    if not target.exists() and primary:
        from longvila_jax.ckpt import vila_import

        if kind == "hf":
            from longvila_jax.ckpt.hf_parts_import import import_hf_parts

            import_hf_parts(
                value[0],
                value[1],
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
    """The model actually trained: the checkpoint's config + ``model_set`` + RoPE changes.

    Raises:
      ConfigError: the checkpoint's parameter tree differs from the stage's model YAML.
    """
    if init_ckpt is None:
        return resolved.model
    from longvila_jax.ckpt import orbax_io
    from longvila_jax.train.state import abstract_param_paths

    st = resolved.stage
    extra = st.rope.overrides() if st.rope else ()
    cfg = orbax_io.read_model_config(init_ckpt, (*st.model_set, *extra))
    got = abstract_param_paths(cfg, with_shapes=True)
    want = abstract_param_paths(resolved.model, with_shapes=True)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ConfigError(
            "model",
            f"{init_ckpt} holds a different model than {st.model}: {diff[0]} is "
            f"{got.get(diff[0])} there and {want.get(diff[0])} in the YAML",
        )
    return cfg


def initial_params(cfg: ModelConfig, init_ckpt: Path | None, template, shardings, seed: int):
    """Flat params placed with ``shardings``: random (seeded) or restored from a checkpoint."""
    if init_ckpt is None:
        from longvila_jax.models.vlm import LongVILA

        def make():
            with nnx.use_eager_sharding(False):
                return flatten_model(LongVILA(cfg, rngs=nnx.Rngs(seed)))

        return jax.jit(make, out_shardings=shardings)()
    from longvila_jax.ckpt import orbax_io
    from longvila_jax.ckpt.checks import check_stored_params

    # Every stored parameter, its shape and dtype against the model (CheckpointError naming
    # it); prepare_init has verified the manifest, so the load does not hash the files again.
    check_stored_params(cfg, orbax_io.stored_tree(init_ckpt), init_ckpt)
    flat = unnest(
        orbax_io.load_params(
            init_ckpt, dtype=cfg.param_dtype, shardings=nest(shardings), verify=False
        )
    )
    return {n: flat[n] for n in template.names}


class _Preemption:
    """SIGTERM sets a flag; the loop saves after the current step and exits."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def run_stage(
    stage: StageConfig,
    *,
    mesh_path: str | None = None,
    progress: bool = True,
    objective_factory: Callable | None = None,
    fail_fast: bool = False,
) -> int:
    """Runs (or resumes) one stage; returns the process exit code (``EXIT_*``).

    Args:
      stage: the stage config.
      mesh_path: mesh YAML overriding ``stage.mesh``.
      progress: show the progress bar.
      objective_factory: ``(resolved, mesh) -> Objective``; default ``OBJECTIVES[stage.objective]``.
      fail_fast: stop at the first bad sample with a ``SampleError`` naming it
        (``DataConfig.fail_fast``; not part of the resume fingerprint).
    """
    from longvila_jax.data.pipeline import DataIterator
    from longvila_jax.parallel.host_shards import data_shard
    from longvila_jax.parallel.mesh import make_mesh

    info = multihost.initialize()
    resolved = resolve_stage(
        stage,
        mesh_path=mesh_path,
        num_devices=info.devices,
        process_count=info.process_count,
        devices_per_process=info.local_devices,
    )
    if fail_fast:
        resolved = dataclasses.replace(
            resolved, data=dataclasses.replace(resolved.data, fail_fast=True)
        )
    primary = info.process_index == 0
    run_dir = Path(stage.run_dir)
    if (run_dir / FINAL_DIR).is_dir() and (not stage.export_vila or (run_dir / VILA_DIR).is_dir()):
        print(f"stage {stage.name}: {run_dir / FINAL_DIR} exists; nothing to do")
        return EXIT_OK
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ckpt = prepare_init(resolved, run_dir, primary)
    model_cfg = runtime_model(resolved, init_ckpt)
    resolved = dataclasses.replace(resolved, model=model_cfg)
    mesh = make_mesh(resolved.mesh)
    template = ModelTemplate.build(model_cfg)
    match_paths(stage.trainable, list(template.names), "trainable")
    param_sh = template.shardings(mesh, resolved.mesh.param_rules)
    optimizer = make_optimizer(stage.optim, stage.steps)
    schedule = make_schedule(stage.optim, stage.steps)
    lora_scale = stage.lora.scale if stage.lora else None
    trainable = set(resolved.trainable_paths)

    def build(params, lora, rng):
        return create_state(params, trainable, optimizer, lora=lora, rng=rng)

    abstract_lora = (
        jax.eval_shape(
            lambda: init_lora(
                template.shapes, resolved.lora_paths, stage.lora.rank, jax.random.key(0)
            )
        )
        if stage.lora
        else None
    )
    abstract = jax.eval_shape(
        build, dict(template.shapes), abstract_lora, jax.ShapeDtypeStruct((2,), jnp.uint32)
    )
    from longvila_jax.train.state import state_shardings

    st_sh = state_shardings(abstract, param_sh, mesh, optimizer)
    kill = KillSwitch.from_env()
    ckpt = Checkpointer(run_dir / "checkpoints", stage.checkpoint, kill)
    # Rows are read per data shard, not per process: the processes of one sequence-parallel
    # group read the same rows and each supplies its devices' slices (``host_shards``).
    shard = data_shard(mesh, resolved.mesh.activation_rules.get("batch", ()))
    data_it = DataIterator(resolved.data, shard.index, shard.count)
    fingerprint = stage_fingerprint(stage, resolved)
    try:  # the newest step matching its integrity manifest; corrupt newer ones moved aside
        latest = ckpt.restorable_step()
    except CorruptCheckpoints:
        ckpt.close()
        data_it.close()
        raise
    metrics = MetricsWriter(
        run_dir,
        stage.steps,
        latest or 0,
        tensorboard=stage.tensorboard,
        enabled=primary,
        progress=progress,
    )
    try:
        for step, problem in ckpt.rejected:
            metrics.event("checkpoint_rejected", step=step, problem=problem)
        if latest is not None:
            check_resume_config(ckpt.read_meta(latest).get("stage"), fingerprint, run_dir, latest)
        if primary:  # only now: a refused config must not replace the one that wrote the run
            save_yaml(stage, run_dir / "stage.yaml")
        if latest is not None:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, st_sh
            )
            state, meta = ckpt.restore(latest, target, data_it)
            start = latest
            metrics.event("resume", step=latest)
        else:
            key = jax.random.key(stage.seed)
            params = initial_params(model_cfg, init_ckpt, template, param_sh, stage.seed)
            lora = (
                init_lora(template.shapes, resolved.lora_paths, stage.lora.rank, key)
                if stage.lora
                else None
            )
            rng = jax.random.key_data(jax.random.fold_in(key, 1)).astype(jnp.uint32)
            state = jax.jit(build, out_shardings=st_sh)(params, lora, rng)
            start = 0
        factory = objective_factory or OBJECTIVES[stage.objective]
        objective = factory(resolved, mesh)
        step_fn = jit_step(
            make_train_step(template, objective, optimizer, schedule, lora_scale=lora_scale),
            st_sh,
            objective.shardings(),
            mesh,
        )
        code = _train(
            stage, state, start, step_fn, objective, data_it, ckpt, kill, metrics, fingerprint
        )
        if isinstance(code, int):
            return code
        state = code
        kill.at("stage_transition", stage.steps)
        finish.arm_kill(run_dir, stage.steps)
        metrics.event("final_phase", step=stage.steps)
        flat = jax.jit(lambda s: model_params(s, lora_scale))(state)
        tok = finish.export_tokenizer_dir(resolved.data) if stage.export_vila else None
        finish.finish_stage(
            run_dir, model_cfg, flat, init_ckpt, tok, step=stage.steps, event=metrics.event
        )
        return EXIT_OK
    finally:
        metrics.close()
        ckpt.close()
        data_it.close()


def _train(stage, state, start, step_fn, objective, data_it, ckpt, kill, metrics, fingerprint):
    """Steps ``start`` .. ``stage.steps``; returns the final state, or an exit code."""
    preempt = _Preemption()
    compiled = None
    last_saved = start
    try:
        for step in range(start, stage.steps):
            batch = next(data_it)
            dev = objective.to_device(batch)
            if compiled is None:
                compiled = step_fn.lower(state, dev).compile()
                mem = compiled.memory_analysis()
                metrics.event("compiled", memory=str(mem) if mem is not None else None)
            state, m = compiled(state, dev)
            m = jax.device_get(m)
            done = step + 1
            seg = np.asarray(batch["segment_ids"])
            metrics.write(
                {
                    "step": done,
                    "loss": float(m["loss"]),
                    "loss_bits": float_bits(m["loss"]),
                    "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens": float(m["tokens"]),
                    "tokens_total": int((seg > 0).sum()),
                    "applied": bool(m["applied"]),
                    "nonfinite": int(m["nonfinite"]),
                    "consecutive_nonfinite": int(m["consecutive_nonfinite"]),
                    "empty_batches": int(m["empty"]),
                    "skipped_samples": data_it.skip_counts,
                    "sample_ids": sample_ids(batch),
                    "batch_sha256": batch_fingerprint(batch),
                }
            )
            kill.at("after_step", done)
            if int(m["consecutive_nonfinite"]) >= stage.max_consecutive_nonfinite:
                ckpt.wait()
                metrics.event("halt_nonfinite", step=done, count=int(m["consecutive_nonfinite"]))
                print(f"halting: {int(m['consecutive_nonfinite'])} non-finite steps in a row")
                return EXIT_NONFINITE
            if done % stage.checkpoint.every == 0 or done == stage.steps or preempt.requested:
                meta = {"step": done, "stage": fingerprint, "skips": data_it.skip_counts}
                try:
                    ckpt.save(done, state, data_it, meta)
                except NonFiniteState as e:
                    metrics.event("halt_nonfinite_state", step=done, error=str(e))
                    print(f"halting: {e}")
                    return EXIT_NONFINITE
                last_saved = done
                metrics.event("checkpoint", step=done)
            if preempt.requested:
                ckpt.wait()
                metrics.event("preempted", step=last_saved)
                print(f"preempted: step {last_saved} committed; rerun the command to continue")
                return EXIT_PREEMPTED
        ckpt.wait()
        return state
    finally:
        preempt.restore()


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NONFINITE",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "init_source",
    "initial_params",
    "prepare_init",
    "run_stage",
    "runtime_model",
    "write_final",
]
