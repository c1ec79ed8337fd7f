"""Per-file SHA-256 manifests: every checkpoint directory the project writes carries one.

A manifest (``integrity.sha256.json``) lists every file of a directory, relative POSIX path ->
``{size, sha256}``. It is written last, inside the directory's temporary name, just before the
rename that makes the directory visible; so a visible directory without a valid manifest, or
whose files differ from it, was damaged or tampered with after it was written. Two kinds:

- training steps (``step`` set; ``train.integrity`` writes it inside Orbax's commit and
  requires the commit marker to be listed);
- model checkpoints (``step`` None: converted checkpoints and a stage's ``final/``;
  ``ckpt.orbax_io`` requires ``model.yaml`` and ``provenance.json`` to be listed).

``verify_dir`` checks a directory before it is read and returns the first problem as
``"<file>: <what is wrong>"``; it never raises on a hostile manifest (deep nesting, duplicate
keys, paths that climb out, wrong types all become a problem string), so a caller can
quarantine the directory. Only regular files and directories may appear: a symlink, FIFO or
other special entry is a problem, and hashing never follows a link or blocks on a FIFO.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from longvila_jax.core.errors import CheckpointError, InputError, brief
from longvila_jax.core.safe_load import parse_json
from longvila_jax.core.safe_paths import check_member, open_regular, read_regular, write_atomic

MANIFEST_FILE = "integrity.sha256.json"
FORMAT = "longvila-jax checkpoint integrity manifest"
VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 4 << 20


def tree_files(root: Path) -> tuple[list[str], str | None]:
    """(relative POSIX paths of the regular files under ``root``, first non-regular entry).

    Links are never followed; a link or special file is reported as ``"<path>: <kind>"``.
    """
    out, problem = [], None
    for dirpath, dirnames, names in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames + names):
            rel = (rel_dir / name).as_posix()
            mode = os.lstat(Path(dirpath) / name).st_mode
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISREG(mode):
                out.append(rel)
            elif problem is None:
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                problem = f"{rel}: {kind}; checkpoints hold regular files only"
    return sorted(out), problem


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open_regular(path, "manifest") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def digests(root: Path, rels: Iterable[str]) -> dict[str, tuple[int, str]]:
    """(size, SHA-256 hex) of each file; hashed in threads (hashlib releases the GIL)."""
    rels = list(rels)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda r: _digest(root / r), rels), strict=True))


def write_manifest(directory: str | os.PathLike, step: int | None = None) -> None:
    """Hashes every file of ``directory`` and writes :data:`MANIFEST_FILE` there atomically.

    Raises:
      CheckpointError: the directory holds a link or special file.
    """
    directory = Path(directory)
    files, problem = tree_files(directory)
    if problem is not None:
        raise CheckpointError(f"{directory}: {problem}")
    side = f".{MANIFEST_FILE}.partial"
    rels = [r for r in files if r not in (MANIFEST_FILE, side)]
    entries = {r: {"size": s, "sha256": d} for r, (s, d) in digests(directory, rels).items()}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "algorithm": "sha256",
        "files": entries,
    }
    write_atomic(directory / MANIFEST_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())


def read_manifest(directory: Path, step: int | None) -> tuple[dict | None, str | None]:
    """(files, None) or (None, problem) for the manifest of ``directory``."""
    path = directory / MANIFEST_FILE
    try:
        raw = read_regular(path, MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
        doc = parse_json(raw, MANIFEST_FILE, CheckpointError)
    except InputError as e:
        if not os.path.lexists(path):
            return None, f"{MANIFEST_FILE}: missing"
        return None, f"{MANIFEST_FILE}: unreadable ({e})"
    files = doc.get("files") if isinstance(doc, dict) else None
    ok = (
        isinstance(doc, dict)
        and doc.get("format") == FORMAT
        and doc.get("version") == VERSION
        and isinstance(files, dict)
        and all(
            isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and not isinstance(v.get("size"), bool)
            and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    )
    if not ok:
        return None, f"{MANIFEST_FILE}: not a version-{VERSION} integrity manifest"
    for rel in files:
        try:
            check_member(rel, MANIFEST_FILE)
        except CheckpointError:
            return None, f"{MANIFEST_FILE}: lists {brief(rel)}, which is not a path inside"
    if doc.get("step") != step:
        return None, f"{MANIFEST_FILE}: written for step {brief(doc.get('step'))}, not {step}"
    return files, None


def verify_dir(
    directory: str | os.PathLike,
    step: int | None = None,
    required: Iterable[str] = (),
    under: str | None = None,
) -> str | None:
    """Checks ``directory`` (or only its sub-folder ``under``) against its manifest.

    Args:
      directory: a checkpoint directory.
      step: the step number the manifest must record (None: a model checkpoint).
      required: files the manifest must list (the commit marker, ``model.yaml`` ...).
      under: a relative sub-folder: only the files there are compared and hashed (a tokenizer
        loader need not hash gigabytes of weights), still every one of them and nothing else.

    Returns:
      None when every file matches, else ``"<relative file>: <problem>"`` for the first bad
      file (missing, wrong size, unlisted, not regular, SHA-256 mismatch; the manifest itself
      missing or unreadable). Sizes are checked for all files before any file is hashed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory.name}: not a directory"
    files, problem = read_manifest(directory, step)
    if problem is not None:
        return problem
    for rel in required:
        if rel not in files:
            return f"{MANIFEST_FILE}: does not list {rel}"
    base = directory if under is None else directory / under
    if under is not None and (base.is_symlink() or not base.is_dir()):
        return f"{under}: not a directory"
    on_disk, problem = tree_files(base)
    if problem is not None:
        return problem if under is None else f"{under}/{problem}"
    if under is None:
        present = set(on_disk) - {MANIFEST_FILE}
    else:
        present = {f"{under}/{rel}" for rel in on_disk}
        files = {rel: v for rel, v in files.items() if rel.startswith(f"{under}/")}
    for rel in sorted(files):
        if rel not in present:
            return f"{rel}: missing"
        size = (directory / rel).stat().st_size
        if size != files[rel]["size"]:
            return f"{rel}: {size} bytes, the manifest recorded {files[rel]['size']}"
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]}: not listed in {MANIFEST_FILE}"
    got = digests(directory, sorted(files))
    for rel in sorted(files):
        if got[rel][1] != files[rel]["sha256"]:
            return f"{rel}: SHA-256 differs from the manifest"
    return None


__all__ = [
    "MANIFEST_FILE",
    "digests",
    "read_manifest",
    "tree_files",
    "verify_dir",
    "write_manifest",
]
