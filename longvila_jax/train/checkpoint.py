"""Checkpoints of a run: Orbax CheckpointManager (async, keep-N), finite-gated commits, kill sites.

Every checkpoint is one Orbax ``Composite`` (from step 0, see stack.md §5) of:

- ``state``: the whole train state pytree (params, LoRA, optimizer state, counters, RNG);
- ``data_iter``: the data iterator state, one JSON per process (grain's checkpoint handler);
- ``meta``: JSON with the step, the stage config fingerprint and host-side counters.

Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a process
killed at any moment leaves either a committed step or an ignored temp dir (cleaned on the next
start). Before each save, a device-side reduction checks that every floating leaf is finite; a
non-finite state raises :class:`NonFiniteState` and nothing is written.

Integrity (reliability scenario 12, :mod:`longvila_jax.train.integrity`): each step directory
carries a per-file SHA-256 manifest, written inside the temp dir before the commit rename.
:meth:`Checkpointer.restorable_step` verifies steps newest first before anything is read:

- A step that fails verification is never loaded. A warning names the step and its first bad
  file, and the next older step is tried.
- Failed steps newer than the chosen one are moved to ``<checkpoints>/corrupt/`` (kept for
  inspection, not deleted). Orbax no longer sees them, so they neither block the step numbers
  the resumed run will write nor count toward keep-N.
- If steps exist but none verifies, :class:`CorruptCheckpoints` is raised rather than
  starting from scratch.

Retention is Orbax's ``max_to_keep`` (``keep`` >= 2, checked by the config). Orbax chooses the
steps to delete when a save is dispatched, but deletes them only after that save has committed,
in its finalize thread; a save that fails raises before any deletion. So the good step a run
resumed from is deleted only once a newer step, with its own manifest, has been committed.

Fault injection (tests only): a :class:`~longvila_jax.train.kill_switch.KillSwitch` places the
save window's kill points (``save_start``, ``after_dispatch``, the watched in-flight sites,
``after_commit``); :mod:`longvila_jax.train.kill_switch` lists them. Unarmed, it does nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from longvila_jax.config.train import CheckpointConfig
from longvila_jax.core.errors import CheckpointError
from longvila_jax.train.integrity import manifested_rename_class, verify_step_dir
from longvila_jax.train.kill_switch import KillSwitch
from longvila_jax.train.state import all_finite

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"  # failed steps newer than the restored one are moved here


class NonFiniteState(RuntimeError):
    """The train state holds NaN/Inf; it must never be committed."""


class CorruptCheckpoints(CheckpointError, RuntimeError):
    """Committed checkpoints exist but none matches its integrity manifest."""


class _IterState:
    """Adapter giving grain's checkpoint handler a frozen snapshot of the iterator state.

    The snapshot is taken when the save is dispatched: the handler may run later, in Orbax's
    background thread, while the loop has already advanced the live iterator.
    """

    def __init__(self, iterator: Any, snapshot: dict | None = None):
        self.iterator = iterator
        self.snapshot = snapshot

    def get_state(self) -> bytes:
        return json.dumps(self.snapshot, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


_finite = jax.jit(all_finite)
_HANDLER_SET = False


class Checkpointer:
    """Orbax manager of one run directory's ``checkpoints/``.

    Args:
      directory: checkpoint directory (created).
      cfg: checkpoint settings (``keep``, ``async_save``).
      kill: fault-injection switch (tests).
    """

    def __init__(
        self, directory: str | Path, cfg: CheckpointConfig, kill: KillSwitch | None = None
    ):
        # Replica-parallel writes slice replicated arrays with one jit per shape (tens of
        # compilations on the first save on CPU); each shard's first replica writes it whole.
        global _HANDLER_SET
        if not _HANDLER_SET:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
            _HANDLER_SET = True
        self.directory = Path(directory).absolute()
        self.kill = kill or KillSwitch()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
            temporary_path_class=manifested_rename_class(self.directory),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self._last_dispatched: int | None = None
        self._verified: set[int] = set()
        # (step, first bad file) of the steps rejected by restorable_step, newest first.
        self.rejected: list[tuple[int, str]] = []

    def latest_step(self) -> int | None:
        """Newest committed step, unverified (temp dirs of interrupted saves are never listed)."""
        return self.manager.latest_step()

    def verify(self, step: int) -> str | None:
        """None if committed step ``step`` matches its manifest, else its first bad file."""
        problem = verify_step_dir(self.directory / str(step), step)
        if problem is None:
            self._verified.add(step)
        return problem

    def restorable_step(self) -> int | None:
        """The newest committed step whose files match its integrity manifest.

        Steps are tried newest first. Each failure is logged as a warning naming the step and
        its first bad file, and recorded in :attr:`rejected`. Failed steps newer than the
        returned one are moved to ``<checkpoints>/corrupt/``. In a multi-process job, process 0
        verifies and the others receive its answer.

        Returns:
          The step, or None when no step was ever committed (a fresh run).

        Raises:
          CorruptCheckpoints: committed steps exist but none verifies (nothing is moved).
        """
        self.rejected = []
        steps = sorted(self.manager.all_steps(), reverse=True)
        chosen = -1  # no good step (yet)
        if jax.process_index() == 0:
            for step in steps:
                problem = self.verify(step)
                if problem is None:
                    chosen = step
                    break
                self.rejected.append((step, problem))
                log.warning(
                    "checkpoint step %d in %s is corrupt (%s); trying the previous one",
                    step,
                    self.directory,
                    problem,
                )
            if chosen >= 0:
                for step, _ in self.rejected:
                    self._quarantine(step)
        moved = len(self.rejected) if chosen >= 0 else 0
        if jax.process_count() > 1:  # process 0's answer, after its moves (a barrier too)
            answer = np.array([chosen, moved], np.int32)
            chosen, moved = map(int, multihost_utils.broadcast_one_to_all(answer))
            if chosen >= 0:
                self._verified.add(chosen)
        if chosen < 0 and steps:
            detail = "; ".join(f"step {s}: {p}" for s, p in self.rejected) or "see process 0"
            raise CorruptCheckpoints(
                f"{self.directory}: no committed checkpoint matches its integrity manifest "
                f"({detail}). Refusing to start from scratch over existing checkpoints: restore "
                "good copies, or move the checkpoints away to start over."
            )
        if moved:
            self.manager.reload()
        return None if chosen < 0 else chosen

    def _quarantine(self, step: int) -> None:
        """Moves a failed step out of Orbax's view (kept for inspection)."""
        target_dir = self.directory / CORRUPT_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / str(step)
        n = 1
        while target.exists():
            target = target_dir / f"{step}.{n}"
            n += 1
        shutil.move(str(self.directory / str(step)), str(target))
        log.warning("moved corrupt checkpoint step %d to %s", step, target)

    def _require_verified(self, step: int) -> None:
        if step not in self._verified:
            problem = self.verify(step)
            if problem is not None:
                raise CorruptCheckpoints(f"{self.directory}: step {step} is corrupt ({problem})")

    def save(self, step: int, state: Any, iterator: Any, meta: Mapping[str, Any]) -> None:
        """Dispatches an (async) save of ``step`` after checking every leaf is finite.

        Raises:
          NonFiniteState: the state holds NaN/Inf (nothing is written).
        """
        if not bool(_finite(state)):
            raise NonFiniteState(f"step {step}: the train state holds non-finite values")
        self.kill.at("save_start", step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(_IterState(iterator, iterator.get_state())),
            meta=ocp.args.JsonSave(dict(meta)),
        )
        self.kill.watch_save(self.directory, step)
        self.manager.save(step, args=args, force=True)
        self._last_dispatched = step
        self.kill.at("after_dispatch", step)

    def wait(self) -> None:
        """Blocks until the in-flight save is committed (surfaces async errors)."""
        self.manager.wait_until_finished()
        if self._last_dispatched is not None:
            self.kill.at("after_commit", self._last_dispatched)

    def restore(self, step: int, abstract_state: Any, iterator: Any) -> tuple[Any, dict]:
        """Restores ``step`` into ``abstract_state``'s shapes/shardings and the iterator in place.

        The step is verified against its manifest first (unless this process already did).

        Returns:
          (state, meta).

        Raises:
          CorruptCheckpoints: the step's files do not match its manifest.
        """
        self._require_verified(step)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_iter=grain.checkpoint.CheckpointRestore(_IterState(iterator)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The ``meta`` item of ``step`` (verified first, as :meth:`restore`)."""
        self._require_verified(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


__all__ = ["CORRUPT_DIR", "Checkpointer", "CorruptCheckpoints", "NonFiniteState"]
