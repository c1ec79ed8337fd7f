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
  failure is returned as ``"<file>: <what is wrong>"``; a hostile manifest (nested, huge,
  climbing paths) is a failure too, never an exception, so the step is quarantined.

The manifest itself (format, hashing, verification) is ``core.manifest``, shared with the
model checkpoints of ``ckpt.orbax_io``. For async saves hashing runs in Orbax's background
commit thread, so it delays the commit, not the training step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from longvila_jax.core.manifest import MANIFEST_FILE, verify_dir, write_manifest

COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker (``atomicity.COMMIT_SUCCESS_FILE``)


def verify_step_dir(step_dir: str | Path, step: int) -> str | None:
    """Checks a committed step directory against its manifest (``core.manifest.verify_dir``).

    Args:
      step_dir: ``<checkpoints>/<step>``.
      step: the step number the manifest must record.

    Returns:
      None when every file matches, else ``"<relative file>: <problem>"`` for the first bad
      file (missing, wrong size, unlisted, not regular, SHA-256 mismatch; the manifest itself
      missing, unreadable or not listing the commit marker).
    """
    return verify_dir(step_dir, step, required=(COMMIT_FILE,))


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
