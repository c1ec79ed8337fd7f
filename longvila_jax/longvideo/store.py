"""The data engine's resumable stage results: one append-only JSON-lines journal per stage.

Each finished item (a probed video, a captioned clip, a video's instructions) is one line,
written and fsynced before the next item starts, so a crash loses at most the item in flight
and a rerun skips every key already in the journal. A line cut short by a crash (no newline at
the end of the file) is the item in flight: it is dropped and the file truncated back to the
last whole line. Any other bad line means the file was damaged or edited, and the run stops
with an error naming the file and the line instead of guessing.

The journals live in ``OUT_DIR/work/`` beside a ``run.json`` that records the settings the work
depends on, per stage (clip length, prompt versions, backends); a rerun with different settings
refuses to mix its results into a stage's journal unless told to redo that stage and the later
ones (``--restart-from``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longvila_jax.core.errors import InputError, brief_path
from longvila_jax.core.safe_load import load_json, parse_json
from longvila_jax.core.safe_paths import write_atomic

MAX_LINE = 1 << 22  # 4 MiB: a writer's answer with its QA is a few KB


class Journal:
    """An append-only JSON-lines file of ``{"key": ..., ...}`` records, keyed by ``key``.

    Args:
      path: the file (created on the first :meth:`add`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        if self.path.is_symlink() or not self.path.is_file():
            raise InputError(f"{brief_path(self.path)}: a journal must be a regular file")
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # the item in flight when a run was killed
            with open(self.path, "r+b") as f:
                f.truncate(whole)
                f.flush()
                os.fsync(f.fileno())
        for number, line in enumerate(data[:whole].splitlines(), start=1):
            if len(line) > MAX_LINE:
                raise InputError(f"{brief_path(self.path)}: line {number} is too long")
            rec = parse_json(line, f"{brief_path(self.path)}: line {number}", InputError)
            key = rec.get("key") if isinstance(rec, dict) else None
            if not isinstance(key, str) or not key:
                raise InputError(
                    f"{brief_path(self.path)}: line {number} is not a record with a string key"
                )
            self.records[key] = rec  # a later line for a key wins (a retried item)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def values(self) -> Iterator[dict[str, Any]]:
        return iter(self.records.values())

    def add(self, record: dict[str, Any]) -> None:
        """Appends one record (it must carry a string ``key``) and fsyncs it."""
        key = record.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError(f"a journal record needs a string key, got {key!r}")
        line = json.dumps(record, ensure_ascii=False, allow_nan=False, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = record


STAGES = ("probe", "caption", "write")


def check_run_settings(
    work: Path, settings: dict[str, dict[str, Any]], restart_from: str | None = None
) -> None:
    """Records each stage's settings in ``work/run.json``, or checks them against the recorded.

    Args:
      work: the journals' folder.
      settings: stage name (:data:`STAGES`) -> the settings its results depend on (a later
        stage's results also depend on every earlier stage's).
      restart_from: a stage whose journal and every later one are deleted first, so that
        work is redone from there (new captions, a new writer prompt, ...).

    Raises:
      InputError: naming the first stage whose settings differ from those its journal was made
        with, and the settings, unless ``restart_from`` is that stage or an earlier one.
    """
    path = work / "run.json"
    work.mkdir(parents=True, exist_ok=True)
    first = STAGES.index(restart_from) if restart_from is not None else len(STAGES)
    old = load_json(path, "run settings", InputError) if path.exists() else {}
    for k, stage in enumerate(STAGES):
        if k >= first:
            (work / f"{stage}.jsonl").unlink(missing_ok=True)
            continue
        before, now = old.get(stage), settings.get(stage)
        if before is not None and before != now and (work / f"{stage}.jsonl").exists():
            keys = sorted(set(before) | set(now or {}))
            changed = [key for key in keys if before.get(key) != (now or {}).get(key)]
            raise InputError(
                f"{brief_path(work)}: the {stage} stage was run with other settings "
                f"({', '.join(changed)}); rerun with the same settings, or with "
                f"--restart-from {stage} to redo it and the stages after it"
            )
    write_atomic(path, json.dumps(settings, indent=1, sort_keys=True).encode())


__all__ = ["STAGES", "Journal", "check_run_settings"]
