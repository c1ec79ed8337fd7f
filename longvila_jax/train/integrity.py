"""Per-file SHA-256 manifests of committed checkpoint steps (reliability scenario 12).

Where the manifest lives and why it cannot vouch for a partial checkpoint:

- Orbax writes step ``N`` into ``<root>/N.orbax-checkpoint-tmp`` and commits it with one
  ``rename`` to ``<root>/N`` (the commit); steps are listed by their final name only.
- The run's checkpoints use the ``TemporaryPath`` class made by
  :func:`manifested_rename_class`. Its ``finalize`` runs on the primary process after every
  process's writes have finished and Orbax's own finalisation (merged OCDBT manifest, step
  metadata) is done. It then:
  1. stamps the commit time into ``_CHECKPOINT_METADATA`` and writes the commit marker
     ``commit_success.txt``, as Orbax's own finalize does;
  2. hashes every file of the temp dir and writes :data:`MANIFEST_FILE` in it (to a side file,
     fsynced, then moved into place with ``os.replace``);
  3. renames the temp dir to ``N``.
  The manifest is thus inside the step directory before the step becomes visible. A process
  killed before step 3 leaves only a temp dir, which is never listed and is removed on the next
  start. A visible step without a valid manifest, or whose files differ from it, was damaged
  after its commit (or written by code without manifests).
- :func:`verify_step_dir` checks a step before it is restored. The step must have a parsable
  manifest for its own step number that lists the commit marker. Every listed file must exist
  with the recorded size and SHA-256, and no file may be missing from the list. The first
  failure is returned as ``"<file>: <what is wrong>"``.

Hashing runs in a thread pool (``hashlib`` releases the GIL on large buffers). For async saves
it runs in Orbax's background commit thread, so it delays the commit, not the training step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST_FILE = "integrity.sha256.json"
COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker (``atomicity.COMMIT_SUCCESS_FILE``)
_FORMAT = "longvila-jax checkpoint integrity manifest"
_VERSION = 1
_CHUNK = 4 << 20


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of every non-directory entry under ``root`` (links not followed)."""
    out = []
    for dirpath, _, names in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        out.extend((rel_dir / n).as_posix() for n in names)
    return sorted(out)


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _digests(root: Path, rels: Iterable[str]) -> dict[str, tuple[int, str]]:
    rels = list(rels)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda r: _digest(root / r), rels), strict=True))


def write_manifest(step_dir: str | Path, step: int) -> None:
    """Hashes every file of ``step_dir`` and writes :data:`MANIFEST_FILE` there atomically."""
    step_dir = Path(step_dir)
    target = step_dir / MANIFEST_FILE
    side = step_dir / f".{MANIFEST_FILE}.partial"
    rels = [r for r in _files(step_dir) if r not in (MANIFEST_FILE, side.name)]
    entries = {r: {"size": s, "sha256": d} for r, (s, d) in _digests(step_dir, rels).items()}
    doc = {
        "format": _FORMAT,
        "version": _VERSION,
        "step": step,
        "algorithm": "sha256",
        "files": entries,
    }
    with open(side, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(side, target)


def _read_manifest(step_dir: Path, step: int | None) -> tuple[dict | None, str | None]:
    path = step_dir / MANIFEST_FILE
    if not path.is_file():
        return None, f"{MANIFEST_FILE}: missing"
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        files = doc["files"]
        ok = (
            doc.get("format") == _FORMAT
            and doc.get("version") == _VERSION
            and isinstance(files, dict)
            and all(
                isinstance(v, dict)
                and isinstance(v.get("size"), int)
                and isinstance(v.get("sha256"), str)
                for v in files.values()
            )
        )
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8 and structure errors
        return None, f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})"
    if not ok:
        return None, f"{MANIFEST_FILE}: not a version-{_VERSION} integrity manifest"
    if step is not None and doc.get("step") != step:
        return None, f"{MANIFEST_FILE}: written for step {doc.get('step')!r}, not {step}"
    if COMMIT_FILE not in files:
        return None, f"{MANIFEST_FILE}: does not list the commit marker {COMMIT_FILE}"
    return files, None


def verify_step_dir(step_dir: str | Path, step: int | None = None) -> str | None:
    """Checks a committed step directory against its manifest.

    Args:
      step_dir: ``<checkpoints>/<step>``.
      step: the expected step number (the manifest records it), or None to skip that check.

    Returns:
      None when every file matches, else ``"<relative file>: <problem>"`` for the first bad
      file (missing, wrong size, unlisted, SHA-256 mismatch; the manifest itself missing or
      unreadable). Sizes are checked for all files before any file is hashed.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return f"{step_dir.name}: not a directory"
    files, problem = _read_manifest(step_dir, step)
    if problem is not None:
        return problem
    on_disk = set(_files(step_dir)) - {MANIFEST_FILE}
    for rel in sorted(files):
        if rel not in on_disk:
            return f"{rel}: missing"
        size = (step_dir / rel).stat().st_size
        if size != files[rel]["size"]:
            return f"{rel}: {size} bytes, the manifest recorded {files[rel]['size']}"
    extra = sorted(on_disk - set(files))
    if extra:
        return f"{extra[0]}: not listed in {MANIFEST_FILE}"
    got = _digests(step_dir, sorted(files))
    for rel in sorted(files):
        if got[rel][1] != files[rel]["sha256"]:
            return f"{rel}: SHA-256 differs from the manifest"
    return None


def manifested_rename_class(root: str | Path) -> type:
    """An Orbax ``AtomicRenameTemporaryPath`` that writes the manifest of each step of ``root``
    into its temp dir just before the commit rename (see the module docstring).

    Item directories inside a step (``state``, ``data_iter``, ``meta``) are renamed by the same
    class and are finalised exactly as Orbax does.
    """
    from orbax.checkpoint._src.metadata import checkpoint as step_metadata
    from orbax.checkpoint._src.path import async_path
    from orbax.checkpoint.path import atomicity

    root = Path(root).absolute()

    class ManifestedRename(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            final = Path(self.get_final())
            if final.parent != root or not final.name.isdigit():
                return await super().finalize()
            if self._snapshot is not None:
                raise NotImplementedError("snapshot checkpoints carry no integrity manifest")
            tmp = self.get()
            # Orbax 0.12.8's AtomicRenameTemporaryPath.finalize, with the manifest written
            # between the commit marker and the rename.
            store = self._checkpoint_metadata_store
            if store:
                await asyncio.to_thread(store.wait_until_finished)
                await asyncio.to_thread(
                    store.update,
                    file_path=step_metadata.step_metadata_file_path(tmp),
                    commit_timestamp_nsecs=time.time_ns(),
                )
                await asyncio.to_thread(store.wait_until_finished)
            await async_path.write_text(
                tmp / COMMIT_FILE, f"Checkpoint commit was successful to {final}"
            )
            await asyncio.to_thread(write_manifest, Path(tmp), int(final.name))
            await async_path.rename(tmp, self.get_final())

    ManifestedRename.__qualname__ = ManifestedRename.__name__
    return ManifestedRename


__all__ = [
    "COMMIT_FILE",
    "MANIFEST_FILE",
    "manifested_rename_class",
    "verify_step_dir",
    "write_manifest",
]
