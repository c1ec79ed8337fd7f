"""What runs on each training step the loop yields: metrics, kill points, halting, checkpoints.

The step loop (``loop.training_steps``) yields a :class:`StepResult` as soon as a step is
dispatched to the devices; :class:`Hooks` then runs each registered hook due at that step (as
levanter's ``Trainer.add_hook``). A hook ends training early by raising a :class:`Stop`, which
``loop.run_stage`` turns into the process's exit code. The hooks of a run, in the order they
run:

1. :class:`LateMetrics` writes the *previous* step's ``metrics.jsonl`` record (see below).
2. :meth:`LateMetrics.kill_after_step`: the test-only ``after_step`` kill point.
3. :class:`NonFiniteHalt`: ``max_consecutive_nonfinite`` non-finite steps in a row stop the run.
4. :class:`CheckpointHook`: every ``checkpoint.every`` steps and on the final step.

Metrics are read one step late (as nanodo does). Reading a step's metrics waits for the step to
finish; reading step N's once step N+1 is dispatched lets the host prepare the next batch while
the device computes, instead of idling at every step. A hook that needs the newest values calls
:meth:`LateMetrics.flush`, which reads the pending step at once: the checkpoint hook before every
save, the halt when the step can reach the limit, the kill point, and the loop at the end of
training or when a step fails. The records (keys, values, order) are those a synchronous loop
writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax

from longvila_jax.data.pipeline import DataIterator
from longvila_jax.train.checkpoint import Checkpointer, NonFiniteState
from longvila_jax.train.kill_switch import KillSwitch
from longvila_jax.train.metrics import MetricsWriter, step_record


class Stop(Exception):
    """Training ends before its last step; each subclass is one way (``loop.EXIT_CODES``).

    Args:
      message: the line printed to stdout.
      **fields: the fields of the event logged in ``metrics.jsonl`` (``step`` among them).
    """

    event: ClassVar[str]
    # Whether a checkpoint save still in flight is awaited (committed) before the event.
    wait_for_save: ClassVar[bool] = True

    def __init__(self, message: str, **fields: Any):
        super().__init__(message)
        self.message = message
        self.fields = fields


class NonFiniteSteps(Stop):
    """``max_consecutive_nonfinite`` steps in a row had a non-finite loss or gradient."""

    event = "halt_nonfinite"


class NonFiniteCheckpoint(Stop):
    """The state to checkpoint holds NaN/Inf (nothing was written)."""

    event = "halt_nonfinite_state"
    wait_for_save = False


class Preempted(Stop):
    """SIGTERM: the current step's save is dispatched (committed before the process exits);
    rerunning the command continues."""

    event = "preempted"


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One training step, as the loop yields it right after dispatching it.

    Attributes:
      step: completed steps including this one (1-based, counted over the whole stage).
      state: the train state after the step (device arrays, possibly still being computed).
        The next step donates it: use it only before the loop advances.
      metrics: the step's metrics (``train.step``: device scalars, not read yet).
      fields: the host-side fields of its record (``metrics.batch_fields``), taken at dispatch.
    """

    step: int
    state: Any
    metrics: Mapping[str, jax.Array]
    fields: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Hook:
    """A function run on the steps that are multiples of ``every`` (and on the final step)."""

    fn: Callable[[StepResult], None]
    every: int = 1


class Hooks:
    """The hooks of a run, run in the order they were added."""

    def __init__(self):
        self._hooks: list[Hook] = []

    def add(self, fn: Callable[[StepResult], None], *, every: int = 1) -> None:
        """Runs ``fn(result)`` on each step that is a multiple of ``every`` and on the final one."""
        self._hooks.append(Hook(fn, every))

    def run(self, result: StepResult, *, final: bool) -> None:
        """Runs the hooks due at ``result.step``; ``final``: the run ends after this step (its
        last step, or a preemption), so every hook runs."""
        for hook in self._hooks:
            if final or result.step % hook.every == 0:
                hook.fn(result)


class LateMetrics:
    """The metrics hook: writes step N's record once step N+1 has been dispatched.

    Args:
      writer: where the records go.

    Attributes:
      latest: ``(step, metrics read to the host)`` of the newest record written, or None.
    """

    def __init__(self, writer: MetricsWriter):
        self.writer = writer
        self.latest: tuple[int, dict[str, Any]] | None = None
        self._pending: StepResult | None = None

    def __call__(self, result: StepResult) -> None:
        self.flush()  # the previous step: step ``result.step`` is queued behind it already
        self._pending = result

    def flush(self) -> None:
        """Reads the pending step's metrics (waiting for it to finish) and writes its record."""
        if self._pending is None:
            return
        result, self._pending = self._pending, None
        values = jax.device_get(result.metrics)
        self.writer.write(step_record(result.step, values, result.fields))
        self.latest = (result.step, values)

    def kill_after_step(self, kill: KillSwitch) -> Callable[[StepResult], None]:
        """The ``after_step@<n>`` kill point as a hook: the step has finished and its record is
        written (as the site's name promises) before the process is killed."""

        def hook(result: StepResult) -> None:
            if kill.armed_at("after_step", result.step):
                self.flush()
                kill.at("after_step", result.step)

        return hook


class NonFiniteHalt:
    """Stops the run when ``limit`` steps in a row had a non-finite loss or gradient.

    The decision stays exactly that of a loop reading every step at once. The step counts
    ``consecutive_nonfinite``, which is 0 after a finite step and one more than the previous
    step's otherwise, so step N can reach ``limit`` only if step N-1's count is ``limit - 1`` or
    more. That count was read when step N was dispatched (``LateMetrics`` writes step N-1 then);
    only on such a step, and on a launch's first step (whose predecessor this process never
    read), is step N read at once, before the next batch is drawn. Everywhere else the halt
    costs no wait.

    Args:
      metrics: the run's metrics hook (read through it, so each step is read once).
      limit: ``StageConfig.max_consecutive_nonfinite``.
    """

    def __init__(self, metrics: LateMetrics, limit: int):
        self.metrics = metrics
        self.limit = limit

    def __call__(self, result: StepResult) -> None:
        if self.metrics.latest is not None:
            read_step, values = self.metrics.latest
            count = int(values["consecutive_nonfinite"])
            if read_step == result.step - 1 and count + 1 < self.limit:
                return  # step N's count is at most count + 1: it cannot halt
        self.metrics.flush()
        _, values = self.metrics.latest
        count = int(values["consecutive_nonfinite"])
        if count >= self.limit:
            raise NonFiniteSteps(
                f"halting: {count} non-finite steps in a row", step=result.step, count=count
            )


class CheckpointHook:
    """Saves the state, the data iterator's position and the run's meta (asynchronously).

    Register it with ``every=checkpoint.every``: it then also saves the final step.

    Args:
      checkpointer: the run's checkpoint manager.
      data: the run's data iterator (its position is saved with the state).
      metrics: the run's metrics hook.
      fingerprint: the stage fingerprint stored in each checkpoint's meta.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        data: DataIterator,
        metrics: LateMetrics,
        fingerprint: dict,
    ):
        self.checkpointer = checkpointer
        self.data = data
        self.metrics = metrics
        self.fingerprint = fingerprint

    def __call__(self, result: StepResult) -> None:
        # Every record up to this step is written before its checkpoint can commit: a run that
        # resumes from it re-runs (and logs) only the later steps, so a record still pending
        # when a kill lands after the commit would never be written.
        self.metrics.flush()
        # The generator is paused at this step, so the iterator is just past its batch.
        meta = {"step": result.step, "stage": self.fingerprint, "skips": self.data.skip_counts}
        try:
            self.checkpointer.save(result.step, result.state, self.data, meta)
        except NonFiniteState as e:
            raise NonFiniteCheckpoint(f"halting: {e}", step=result.step, error=str(e)) from e
        self.metrics.writer.event("checkpoint", step=result.step)


__all__ = [
    "CheckpointHook",
    "Hook",
    "Hooks",
    "LateMetrics",
    "NonFiniteCheckpoint",
    "NonFiniteHalt",
    "NonFiniteSteps",
    "Preempted",
    "StepResult",
    "Stop",
]
