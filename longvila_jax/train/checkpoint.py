"""Checkpoints of a run: Orbax CheckpointManager (async, keep-N), finite-gated commits, kill sites.

Every checkpoint is one Orbax ``Composite`` (from step 0, see stack.md §5) of:

- ``state``: the whole train state pytree (params, LoRA, optimizer state, counters, RNG);
- ``data_iter``: the data iterator state, one JSON per process (grain's checkpoint handler);
- ``meta``: JSON with the step, the stage config fingerprint and host-side counters.

Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a process
killed at any moment leaves either a committed step or an ignored temp dir (cleaned on the next
start). Before each save, a device-side reduction checks that every floating leaf is finite; a
non-finite state raises :class:`NonFiniteState` and nothing is written.

Fault injection (tests only): ``LONGVILA_TEST_KILL=<site>@<step>`` SIGKILLs the process at a
named point of the save of step ``<step>`` (or after that step for ``after_step``). Sites are
listed in :data:`KILL_SITES`; ``offset=<seconds>@<step>`` kills that long after the save was
dispatched. Unset, none of this code runs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from longvila_jax.config.train import CheckpointConfig
from longvila_jax.train.state import all_finite

KILL_ENV = "LONGVILA_TEST_KILL"
KILL_SITES = (
    "after_step",  # step finished, no save in flight
    "save_start",  # before the save is dispatched
    "after_dispatch",  # async save dispatched, writes in flight
    "mid_write",  # array data files exist in the temp dir
    "mid_iter_state",  # the iterator-state item is being written
    "before_commit",  # temp dir complete (commit marker written), not yet renamed
    "after_commit",  # committed, before the next save's retention cleanup
    "stage_transition",  # last checkpoint committed, final model not yet written
)
_TMP = ".orbax-checkpoint-tmp"


class NonFiniteState(RuntimeError):
    """The train state holds NaN/Inf; it must never be committed."""


def _die(site: str, step: int) -> None:
    sys.stderr.write(f"[kill-switch] SIGKILL at {site}@{step}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch:
    """Test-only fault injection parsed from ``$LONGVILA_TEST_KILL`` (inactive when unset)."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get(KILL_ENV, "") if spec is None else spec
        self.site: str | None = None
        self.offset: float | None = None
        self.step = -1
        self.label = ""
        if not spec:
            return
        site, _, step = spec.partition("@")
        if not step.isdigit():
            raise ValueError(f"{KILL_ENV}={spec!r}: expected <site>@<step>")
        self.step = int(step)
        if site.startswith("offset="):
            self.offset = float(site[len("offset=") :])
            self.site = "offset"
            self.label = site
        elif site in KILL_SITES:
            self.site = self.label = site
        else:
            raise ValueError(f"{KILL_ENV}: unknown site {site!r} (known: {KILL_SITES})")

    def at(self, site: str, step: int) -> None:
        """Kills the process if ``site@step`` is the armed point."""
        if self.site == site and self.step == step:
            _die(site, step)

    def watch_save(self, directory: Path, step: int) -> None:
        """Arms a watcher thread for the in-flight save of ``step`` (file-based sites)."""
        if self.step != step or self.site not in (
            "offset",
            "mid_write",
            "mid_iter_state",
            "before_commit",
        ):
            return
        tmp = directory / f"{step}{_TMP}"
        final = directory / str(step)
        start = time.monotonic()

        def reached() -> bool:
            if self.site == "offset":
                return time.monotonic() - start >= self.offset
            if self.site == "mid_write":
                d = tmp / f"state{_TMP}" / "ocdbt.process_0" / "d"
                return d.is_dir() and any(d.iterdir())
            if self.site == "mid_iter_state":
                return (tmp / f"data_iter{_TMP}").exists()
            return (tmp / "commit_success.txt").exists()

        def run():
            while True:
                if reached():
                    _die(self.label, step)
                if final.exists():  # the window closed before we saw it: kill late anyway
                    _die(f"{self.label}(late)", step)
                time.sleep(0.0002)

        threading.Thread(target=run, daemon=True, name="kill-switch").start()


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
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # Replica-parallel writes slice replicated arrays with one jit per shape (tens of
        # compilations on the first save on CPU); each shard's first replica writes it whole.
        global _HANDLER_SET
        if not _HANDLER_SET:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
            _HANDLER_SET = True
        self.directory = Path(directory).absolute()
        self.kill = kill or KillSwitch("")
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self._last_dispatched: int | None = None

    def latest_step(self) -> int | None:
        """Newest committed step (temp dirs of interrupted saves are never listed)."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, meta: Mapping[str, Any]) -> None:
        """Dispatches an (async) save of ``step`` after checking every leaf is finite.

        Raises:
          NonFiniteState: the state holds NaN/Inf (nothing is written).
        """
        if not bool(_finite(state)):
            raise NonFiniteState(f"step {step}: the train state holds non-finite values")
        self.kill.at("save_start", step)
        ocp = self._ocp
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=_grain_save(_IterState(iterator, iterator.get_state())),
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

        Returns:
          (state, meta).
        """
        ocp = self._ocp
        import grain

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
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _grain_save(item):
    import grain

    return grain.checkpoint.CheckpointSave(item)


__all__ = ["KILL_ENV", "KILL_SITES", "Checkpointer", "KillSwitch", "NonFiniteState"]
