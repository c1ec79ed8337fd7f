"""The stage-agnostic training loop: resolve, initialise or resume, train, checkpoint, finish.

Order of a run (every check that can fail on config happens before anything compiles):

1. ``multihost.initialize``; ``resolve_stage`` cross-checks stage, model, data and mesh files.
2. Resolve ``init_from`` to a project checkpoint (importing HF/VILA layouts into
   ``<run_dir>/init`` once), build the model template and shardings (:mod:`.start`).
3. If ``<run_dir>/checkpoints`` has a committed step, restore state, data iterator and meta from
   the newest one that matches its integrity manifest (older ones are tried when it does not;
   all corrupt raises), refusing a different stage config (:mod:`.fingerprint`); else
   initialise the state.
4. Jit the step with explicit shardings; it is compiled ahead of time on the first batch
   (memory analysis logged).
5. Train: :func:`training_steps` yields each step once dispatched, and the hooks of
   :mod:`.hooks` run on it: the step's metrics record (written one step late), the non-finite
   halt, a checkpoint every ``checkpoint.every`` steps and at the end. SIGTERM saves the
   current step and exits with :data:`EXIT_PREEMPTED`; ``max_consecutive_nonfinite`` skipped
   steps in a row exit with :data:`EXIT_NONFINITE` (each a ``hooks.Stop``, mapped to its exit
   code by :data:`EXIT_CODES`).
6. Write the final project checkpoint ``<run_dir>/final`` (LoRA merged) for the next stage's
   ``stage:<name>``; optionally export it to the VILA layout (``<run_dir>/vila``)
   (:mod:`.finish`, which also lists the kill points of that phase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from longvila_jax.config.base import save_yaml
from longvila_jax.config.train import StageConfig
from longvila_jax.data.pipeline import DataIterator
from longvila_jax.parallel.host_shards import data_shard
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.train import finish, multihost
from longvila_jax.train.checkpoint import Checkpointer, CorruptCheckpoints
from longvila_jax.train.fingerprint import check_resume_config, stage_fingerprint
from longvila_jax.train.finish import FINAL_DIR, VILA_DIR, write_final
from longvila_jax.train.hooks import (
    CheckpointHook,
    Hooks,
    LateMetrics,
    NonFiniteCheckpoint,
    NonFiniteHalt,
    NonFiniteSteps,
    Preempted,
    StepResult,
    Stop,
)
from longvila_jax.train.kill_switch import KillSwitch
from longvila_jax.train.metrics import MetricsWriter, batch_fields
from longvila_jax.train.objective import OBJECTIVES, Objective
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.resolve import ResolvedStage, match_paths, resolve_stage
from longvila_jax.train.start import StateLayout, forward_template, prepare_init, runtime_model
from longvila_jax.train.state import model_params
from longvila_jax.train.step import jit_step, make_train_step

EXIT_OK = 0
EXIT_FAILED = 1  # a bad input (InputError): one ``error: ...`` line from the CLI
EXIT_CONFIG = 2  # a bad config (ConfigError): one ``config error: ...`` line, nothing compiled
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to continue
# How each early end of training (a hooks.Stop) exits: the one place they meet the codes.
EXIT_CODES: dict[type[Stop], int] = {
    NonFiniteSteps: EXIT_NONFINITE,
    NonFiniteCheckpoint: EXIT_NONFINITE,
    Preempted: EXIT_PREEMPTED,
}


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What one launch of a stage trains with (built by :func:`run_stage`)."""

    stage: StageConfig
    step_fn: Any  # the jitted train step (``train.step.jit_step``)
    objective: Objective
    data: DataIterator
    checkpointer: Checkpointer
    kill: KillSwitch
    metrics: MetricsWriter
    fingerprint: dict  # ``fingerprint.stage_fingerprint``, stored in every checkpoint


class Preemption:
    """SIGTERM sets :attr:`requested`; the loop then saves the current step and stops.

    A context manager: the previous SIGTERM handler is back once training ends.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def training_steps(
    state: dict,
    steps: range,
    step_fn: Any,
    objective: Objective,
    data: DataIterator,
    on_compiled: Callable[[Any], None],
) -> Iterator[StepResult]:
    """Runs the train step on the next batch for each of ``steps``, yielding each step as soon
    as it is dispatched (the device may still be computing it).

    Args:
      state: the train state before ``steps[0]``.
      steps: the 0-based step indices to run (``range(first, stage.steps)``).
      step_fn: the jitted train step.
      objective: turns host batches into the step's device arrays.
      data: the data iterator (one global batch per step).
      on_compiled: called once with the compiled step.

    Yields:
      A :class:`StepResult` per step. While the caller holds it the generator is paused, so
      the data iterator stands just past that step's batch (what a checkpoint must save).

    Raises:
      RuntimeError: the data ran out before the last step.
    """
    compiled = None
    for index in steps:
        try:
            batch = next(data)
        except StopIteration:  # inside a generator it would surface as a bare RuntimeError
            raise RuntimeError(f"the data ran out before step {index + 1}") from None
        device_batch = objective.to_device(batch)
        if compiled is None:
            # Compiled ahead of time on the first batch (static shapes), so the memory analysis
            # can be logged before the first step runs.
            compiled = step_fn.lower(state, device_batch).compile()
            on_compiled(compiled)
        state, metrics = compiled(state, device_batch)  # returns once dispatched
        # The record's host-side fields are taken now, while the device computes: the skip
        # counts must be those after this batch, before the next one is drawn.
        yield StepResult(index + 1, state, metrics, batch_fields(batch, data.skip_counts))


def train(parts: RunParts, state: dict, first_step: int) -> dict:
    """Runs steps ``first_step`` .. ``stage.steps`` with the run's hooks.

    Args:
      parts: the launch's parts.
      state: the train state after ``first_step`` steps.
      first_step: completed steps so far (the restored checkpoint's, or 0).

    Returns:
      The train state after the last step, once its checkpoint is committed.

    Raises:
      Stop: training ended early (halted, preempted); :func:`run_stage` maps it to an exit code.
    """
    stage = parts.stage
    metrics = LateMetrics(parts.metrics)
    hooks = Hooks()
    hooks.add(metrics)
    hooks.add(metrics.kill_after_step(parts.kill))
    hooks.add(NonFiniteHalt(metrics, stage.max_consecutive_nonfinite))
    hooks.add(
        CheckpointHook(parts.checkpointer, parts.data, metrics, parts.fingerprint),
        every=stage.checkpoint.every,
    )

    def log_compiled(compiled) -> None:
        memory = compiled.memory_analysis()
        parts.metrics.event("compiled", memory=str(memory) if memory is not None else None)

    steps = training_steps(
        state,
        range(first_step, stage.steps),
        parts.step_fn,
        parts.objective,
        parts.data,
        log_compiled,
    )
    with Preemption() as preemption, contextlib.closing(steps):
        try:
            for result in steps:
                # Read once: the step that saves for a preemption is the step that stops.
                preempting = preemption.requested
                hooks.run(result, final=preempting or result.step == stage.steps)
                if preempting:
                    raise Preempted(
                        f"preempted: step {result.step} committed; rerun the command to continue",
                        step=result.step,
                    )
                state = result.state
        except BaseException:
            # A failing step (bad data, a device error) keeps the records of the steps before
            # it, as a loop reading every step at once would. A second error while reading is
            # dropped so that the caller sees the first one. (After a Stop nothing is pending.)
            with contextlib.suppress(Exception):
                metrics.flush()
            raise
    metrics.flush()
    parts.checkpointer.wait()
    return state


def _stopped(stop: Stop, checkpointer: Checkpointer, metrics: MetricsWriter) -> int:
    """Logs an early end of training; returns its exit code (:data:`EXIT_CODES`)."""
    if stop.wait_for_save:
        checkpointer.wait()
    metrics.event(stop.event, **stop.fields)
    print(stop.message)
    return EXIT_CODES[type(stop)]


def _final_phase(
    parts: RunParts, resolved: ResolvedStage, state: dict, init_ckpt: Path | None
) -> None:
    """Writes ``final/`` (LoRA merged) and, with ``export_vila``, ``vila/``."""
    stage = parts.stage
    run_dir = Path(stage.run_dir)
    parts.kill.at("stage_transition", stage.steps)
    finish.arm_kill(run_dir, stage.steps)
    parts.metrics.event("final_phase", step=stage.steps)
    lora_scale = stage.lora.scale if stage.lora else None
    flat = jax.jit(lambda s: model_params(s, lora_scale))(state)
    tokenizer = finish.export_tokenizer_dir(resolved.data) if stage.export_vila else None
    finish.finish_stage(
        run_dir,
        resolved.model,
        flat,
        init_ckpt,
        tokenizer,
        step=stage.steps,
        event=parts.metrics.event,
    )


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
    # Joins a multi-process job before anything touches the JAX backend.
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
    # From here on the model is the start checkpoint's own config (+ model_set, RoPE changes).
    resolved = dataclasses.replace(resolved, model=runtime_model(resolved, init_ckpt))
    mesh = make_mesh(resolved.mesh)
    template = forward_template(resolved)  # computes in the stage's precision.compute
    match_paths(stage.trainable, list(template.names), "trainable")
    param_shardings = template.shardings(mesh, resolved.mesh.param_rules)
    optimizer = make_optimizer(stage.optim, stage.steps)
    layout = StateLayout.of(resolved, template, optimizer, param_shardings, mesh)
    kill = KillSwitch.from_env()
    checkpointer = Checkpointer(run_dir / "checkpoints", stage.checkpoint, kill)
    # Rows are read per data shard, not per process: the processes of one sequence-parallel
    # group read the same rows and each supplies its devices' slices (``host_shards``).
    shard = data_shard(mesh, resolved.mesh.activation_rules.get("batch", ()))
    data = DataIterator(resolved.data, shard.index, shard.count)
    fingerprint = stage_fingerprint(stage, resolved)
    try:  # the newest step matching its integrity manifest; corrupt newer ones moved aside
        latest = checkpointer.restorable_step()
    except CorruptCheckpoints:
        checkpointer.close()
        data.close()
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
        for step, problem in checkpointer.rejected:
            metrics.event("checkpoint_rejected", step=step, problem=problem)
        if latest is not None:
            stored = checkpointer.read_meta(latest).get("stage")
            check_resume_config(stored, fingerprint, run_dir, latest)
        if primary:  # only now: a refused config must not replace the one that wrote the run
            save_yaml(stage, run_dir / "stage.yaml")
        if latest is not None:
            # The data iterator is restored in place, to just past the checkpoint's last batch.
            state, _ = checkpointer.restore(latest, layout.restore_target(), data)
            metrics.event("resume", step=latest)
        else:
            state = layout.fresh(resolved, template, init_ckpt, param_shardings)
        objective = (objective_factory or OBJECTIVES[stage.objective])(resolved, mesh)
        train_step = make_train_step(
            template,
            objective,
            optimizer,
            make_schedule(stage.optim, stage.steps),
            lora_scale=stage.lora.scale if stage.lora else None,
        )
        step_fn = jit_step(train_step, layout.shardings, objective.shardings(), mesh)
        parts = RunParts(stage, step_fn, objective, data, checkpointer, kill, metrics, fingerprint)
        try:
            state = train(parts, state, latest or 0)
        except Stop as stop:
            return _stopped(stop, checkpointer, metrics)
        # A relaunch after a kill in this phase restores the last checkpoint (no step left to
        # run) and comes straight here; finish_stage keeps what an earlier launch wrote.
        _final_phase(parts, resolved, state, init_ckpt)
        return EXIT_OK
    finally:
        metrics.close()
        checkpointer.close()
        data.close()


__all__ = [
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NONFINITE",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "FINAL_DIR",
    "RunParts",
    "run_stage",
    "train",
    "training_steps",
    "write_final",
]
