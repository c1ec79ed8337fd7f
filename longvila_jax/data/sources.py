"""Random-access manifest sources (JSON list, JSONL, ArrayRecord) and safe media paths.

A source returns raw records: ``{"dataset", "index", "raw"}`` where ``raw`` is the parsed JSON
object (JSON list manifests) or the undecoded bytes of one JSONL line / ArrayRecord record. Bytes
are decoded in the per-sample transform so that a non-UTF-8 or malformed line is one skipped sample,
not a crashed run. JSONL files are indexed by byte offset once, then read by seeking, so large
manifests are not held in memory. Every source has a SHA-256 fingerprint of its file, stored in
the iterator state so a changed manifest is caught on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from longvila_jax.data.skips import SampleSkipped


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".arrayrecord", ".array_record"):
        return "arrayrecord"
    raise ValueError(f"manifest {path}: unknown extension {suffix!r}; set the dataset's format")


class ManifestSource:
    """A grain random-access data source over one manifest file.

    Args:
      path: manifest file.
      dataset: dataset name copied into every record (sample ids, skip logs).
      fmt: ``json`` (a list of objects), ``jsonl`` (one object per line), ``arrayrecord`` (one
        JSON object per record) or ``auto`` (from the extension).

    Raises:
      ValueError: the manifest cannot be read as a whole (missing, not a JSON list...).
    """

    def __init__(self, path: str | os.PathLike, dataset: str, fmt: str = "auto"):
        self.path = Path(path)
        self.dataset = dataset
        if not self.path.is_file():
            raise ValueError(f"dataset {dataset!r}: manifest {self.path} does not exist")
        self.format = detect_format(self.path, fmt)
        self.fingerprint = file_fingerprint(self.path)
        self._records: list[Any] | None = None
        self._offsets: list[int] | None = None
        self._ar = None
        if self.format == "json":
            try:
                records = json.loads(self.path.read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"dataset {dataset!r}: manifest {self.path}: {e}") from None
            if not isinstance(records, list):
                raise ValueError(f"dataset {dataset!r}: {self.path} must hold a JSON list")
            self._records = records
        elif self.format == "jsonl":
            offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self._offsets = offsets
        elif self.format == "arrayrecord":
            self._open_arrayrecord()
        else:
            raise ValueError(f"dataset {dataset!r}: unknown manifest format {self.format!r}")

    def _open_arrayrecord(self):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._ar = ArrayRecordDataSource([str(self.path)])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ar"] = None  # reopened lazily in the worker process
        return state

    def __len__(self) -> int:
        if self._records is not None:
            return len(self._records)
        if self._offsets is not None:
            return len(self._offsets)
        if self._ar is None:
            self._open_arrayrecord()
        return len(self._ar)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self._records is not None:
            raw: Any = self._records[index]
        elif self._offsets is not None:
            with open(self.path, "rb") as f:
                f.seek(self._offsets[index])
                raw = f.readline()
        else:
            if self._ar is None:
                self._open_arrayrecord()
            raw = self._ar[index]
        return {"dataset": self.dataset, "index": index, "raw": raw}

    def __repr__(self) -> str:
        return f"ManifestSource({self.path}, dataset={self.dataset!r}, n={len(self)})"


def parse_record(element: dict[str, Any]) -> dict[str, Any]:
    """Decodes a source element's ``raw`` field into a JSON object.

    Raises:
      SampleSkipped: ``bad_text_encoding`` (not UTF-8) or ``bad_record`` (not a JSON object).
    """
    raw = element["raw"]
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleSkipped("bad_text_encoding", str(e)) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SampleSkipped("bad_record", f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SampleSkipped("bad_record", f"expected a JSON object, got {type(raw).__name__}")
    return raw


def resolve_media(root: Path, rel: Any) -> Path:
    """Resolves a manifest media path under ``root``, refusing anything that escapes it.

    The check is lexical (absolute paths and ``..`` that climb out are refused): symlinks inside the
    root are the data owner's choice (e.g. ``root/videos -> /mnt/nfs/videos``) and are followed.

    Raises:
      SampleSkipped: ``bad_record`` (not a string), ``path_outside_root`` or ``missing_file``.
    """
    if not isinstance(rel, str) or not rel:
        raise SampleSkipped("bad_record", f"media path must be a non-empty string, got {rel!r}")
    root = Path(os.path.abspath(root))
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root):
        raise SampleSkipped("path_outside_root", f"{rel!r} resolves outside {root}")
    if not path.exists():
        raise SampleSkipped("missing_file", str(path))
    return path


__all__ = ["ManifestSource", "detect_format", "file_fingerprint", "parse_record", "resolve_media"]
