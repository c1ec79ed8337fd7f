"""Test-only fault injection for the training loop: named SIGKILL points in the save window.

``LONGVILA_TEST_KILL`` (parsed by ``core.faults``) arms one kill per launch:

- ``<site>@<step>`` for the step-keyed :data:`KILL_SITES`: the end of training step ``<step>``,
  the save of checkpoint ``<step>``, or the final phase;
- ``offset=<s>@<step>``: ``<s>`` seconds after the save of ``<step>`` was dispatched;
- ``<site>@<n>`` for :data:`COUNTED_SITES`: the ``n``-th time a launch reaches that point of the
  ``ckpt/`` writers (``core.faults.hit`` fires those);
- a time-based kill of the final phase (``train.finish.arm_kill``).

A fired kill writes ``[kill-switch] SIGKILL at <site>@<n>`` to stderr (``core.faults.die``; the
kill-and-resume tests match that line) and SIGKILLs the process. Unset, none of this code acts:
:class:`KillSwitch` is inactive and every check returns at once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from longvila_jax.core import faults

KILL_ENV = faults.KILL_ENV
KILL_SITES = (  # step-keyed: <site>@<step>
    "after_step",  # step finished, no save in flight
    "save_start",  # before the save is dispatched
    "after_dispatch",  # async save dispatched, writes in flight
    "mid_write",  # array data files exist in the temp dir
    "mid_iter_state",  # the iterator-state item is being written
    "before_commit",  # temp dir complete (commit marker written), not yet renamed
    "after_commit",  # committed, before the next save's retention cleanup
    "stage_transition",  # last checkpoint committed, final model not yet written
    "final_written",  # final/ committed (by this launch or an earlier one), export not begun
    "stage_done",  # final/ (and vila/) committed, the "final" event not yet logged
)
COUNTED_SITES = (  # core.faults points of ckpt/ writers: <site>@<n>, the n-th in a launch
    "ckpt_group",  # ParamWriter.flush: one Orbax partial save of final/'s params done
    "dir_commit",  # atomic_dir: output complete in its temp dir, not yet renamed (final/, vila/)
    "export_file",  # SafetensorsWriter.close: one safetensors file of vila/ renamed into place
)
# Sites inside an async save: a watcher thread polls the step's temp dir for them.
_WATCHED = ("offset", "mid_write", "mid_iter_state", "before_commit")
ORBAX_TMP = ".orbax-checkpoint-tmp"  # suffix of the dir Orbax writes a step into
_POLL_S = 0.0002  # the watcher's polling period: short, the windows last milliseconds


class KillSwitch:
    """The training loop's kill points (inactive unless armed).

    Args:
      armed: ``(site, n)`` as :func:`core.faults.armed` returns it, or None (inactive). Use
        :meth:`from_env` for the switch ``$LONGVILA_TEST_KILL`` arms.

    Sites this class does not know (``COUNTED_SITES``, the final phase's, another module's)
    are left to ``core.faults.hit`` and ``train.finish.arm_kill``, which read the same
    variable.
    """

    def __init__(self, armed: tuple[str, int] | None = None):
        self.site: str | None = None
        self.offset: float | None = None
        self.step = -1
        self.label = ""
        if armed is None:
            return
        site, self.step = armed
        self.site = self.label = site
        kind, eq, seconds = site.partition("=")
        if eq and kind == "offset":
            self.site, self.offset = kind, float(seconds)  # ValueError if not a number

    @classmethod
    def from_env(cls) -> KillSwitch:
        """The switch armed by ``$LONGVILA_TEST_KILL`` (inactive when unset).

        Raises:
          ValueError: the variable is set but not ``<site>@<n>``.
        """
        armed = faults.armed()
        if armed is None and os.environ.get(KILL_ENV):
            raise ValueError(f"{KILL_ENV}={os.environ[KILL_ENV]!r}: expected <site>@<n>")
        return cls(armed)

    def armed_at(self, site: str, step: int) -> bool:
        """True if ``site@step`` is the armed point (the caller may tidy up before :meth:`at`)."""
        return self.site == site and self.step == step

    def at(self, site: str, step: int) -> None:
        """Kills the process if ``site@step`` is the armed point."""
        if self.armed_at(site, step):
            faults.die(f"{site}@{step}")

    def watch_save(self, directory: Path, step: int) -> None:
        """Arms a watcher thread for the in-flight save of ``step`` (file-based sites).

        Args:
          directory: the checkpoint directory the save writes into.
          step: the step being saved.
        """
        if self.step != step or self.site not in _WATCHED:
            return
        tmp = directory / f"{step}{ORBAX_TMP}"
        final = directory / str(step)
        start = time.monotonic()

        def reached() -> bool:
            if self.site == "offset":
                return time.monotonic() - start >= self.offset
            if self.site == "mid_write":
                data_dir = tmp / f"state{ORBAX_TMP}" / "ocdbt.process_0" / "d"
                return data_dir.is_dir() and any(data_dir.iterdir())
            if self.site == "mid_iter_state":
                return (tmp / f"data_iter{ORBAX_TMP}").exists()
            return (tmp / "commit_success.txt").exists()

        def run():
            while True:
                if reached():
                    faults.die(f"{self.label}@{step}")
                if final.exists():  # the window closed before we saw it: kill late anyway
                    faults.die(f"{self.label}(late)@{step}")
                time.sleep(_POLL_S)

        threading.Thread(target=run, daemon=True, name="kill-switch").start()


__all__ = ["COUNTED_SITES", "KILL_ENV", "KILL_SITES", "ORBAX_TMP", "KillSwitch"]
