"""Random-access manifest sources (JSON list, JSONL, ArrayRecord) and safe media paths.

A source returns raw records: ``{"dataset", "index", "raw"}`` where ``raw`` is the parsed JSON
object (JSON list manifests) or the undecoded bytes of one JSONL line / ArrayRecord record. Bytes
are decoded in the per-sample transform so that a non-UTF-8 or malformed line is one skipped sample,
not a crashed run. JSONL files are indexed by byte offset once, then read by seeking, so large
manifests are not held in memory. Every source has a SHA-256 fingerprint of its file, stored in
the iterator state so a changed manifest is caught on resume.

Manifests come from the internet: every format must be a regular file (``core.safe_paths``
refuses a FIFO before a read can block), JSON lists and JSONL lines go through the checked
parser of ``core.safe_load`` (depth limit, duplicate keys, NaN refused), and a manifest that
cannot be read as a whole raises ``ManifestError`` naming the dataset and the file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_load import load_json, parse_json
from longvila_jax.core.safe_paths import open_regular
from longvila_jax.data.skips import SampleSkipped

_FORMATS = ("json", "jsonl", "arrayrecord")


class ManifestError(InputError):
    """A manifest cannot be used as a whole: missing, not a regular file, malformed or empty."""


def file_fingerprint(path: str | os.PathLike, what: str = "manifest") -> str:
    """SHA-256 hex digest of a regular file's bytes.

    Raises:
      ManifestError: naming ``what``: missing or not a regular file.
    """
    h = hashlib.sha256()
    with open_regular(path, what, ManifestError) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path, fmt: str = "auto") -> str:
    """``fmt``, or the format ``auto`` picks from the extension of ``path``.

    Raises:
      ManifestError: an unknown extension under ``auto``.
    """
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".arrayrecord", ".array_record"):
        return "arrayrecord"
    raise ManifestError(
        f"manifest {path}: unknown extension {brief(suffix)}; set the dataset's format"
    )


class ManifestSource:
    """A grain random-access data source over one manifest file.

    Args:
      path: manifest file.
      dataset: dataset name copied into every record (sample ids, skip logs).
      fmt: ``json`` (a list of objects), ``jsonl`` (one object per line), ``arrayrecord`` (one
        JSON object per record) or ``auto`` (from the extension).

    Raises:
      ManifestError: naming the dataset and the file: the manifest cannot be read as a whole
        (missing, not a regular file, not a JSON list, nested too deep, unknown format).
    """

    def __init__(self, path: str | os.PathLike, dataset: str, fmt: str = "auto"):
        self.path = Path(path)
        self.dataset = dataset
        what = f"dataset {dataset!r} manifest"
        self._what = what
        try:
            self.format = detect_format(self.path, fmt)
        except ManifestError as e:
            raise ManifestError(f"dataset {dataset!r}: {e}") from None
        if self.format not in _FORMATS:
            raise ManifestError(f"{what}: unknown manifest format {brief(self.format)}")
        self.fingerprint = file_fingerprint(self.path, what)  # also: a regular file, readable
        self._records: list[Any] | None = None
        self._offsets: list[int] | None = None
        self._ar = None
        if self.format == "json":
            # No size cap (data manifests are large); depth-limited, so no RecursionError.
            self._records = load_json(self.path, what, ManifestError, expect=list, max_bytes=None)
        elif self.format == "jsonl":
            offsets, pos = [], 0
            with open_regular(self.path, what, ManifestError) as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self._offsets = offsets
        else:
            self._open_arrayrecord()

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
            with open_regular(self.path, self._what, ManifestError) as f:
                f.seek(self._offsets[index])
                raw = f.readline()
        else:
            if self._ar is None:
                self._open_arrayrecord()
            raw = self._ar[index]
        return {"dataset": self.dataset, "index": index, "raw": raw}

    def __repr__(self) -> str:
        return f"ManifestSource({self.path}, dataset={self.dataset!r}, n={len(self)})"


class GroupedSource:
    """Consecutive records of a ``ManifestSource`` taken ``size`` at a time, as one element.

    Element ``i`` holds records ``[i * size, (i + 1) * size)``: ``{"dataset", "index": i * size,
    "raw": [raw, ...]}``. A trailing incomplete group is dropped, as upstream's
    ``LazyCoyoDataset`` does (``llava/data/dataset.py``, ``n_samples_per_idx``). Shuffling and
    mixing then move whole groups.
    """

    def __init__(self, source: ManifestSource, size: int):
        if size < 1:
            raise ValueError(f"group size must be >= 1, got {size}")
        self.source, self.size = source, size
        self.path, self.dataset = source.path, source.dataset
        self.fingerprint = source.fingerprint

    def __len__(self) -> int:
        return len(self.source) // self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = int(index) * self.size
        raws = [self.source[start + j]["raw"] for j in range(self.size)]
        return {"dataset": self.dataset, "index": start, "raw": raws}

    def __repr__(self) -> str:
        return f"GroupedSource({self.source!r}, size={self.size})"


def open_source(
    path: str | os.PathLike, dataset: str, fmt: str = "auto", group: int = 1
) -> ManifestSource | GroupedSource:
    """``ManifestSource`` of ``path``, grouped ``group`` records at a time when ``group`` > 1.

    Raises:
      ManifestError: as ``ManifestSource``.
    """
    src = ManifestSource(path, dataset, fmt)
    return GroupedSource(src, group) if group > 1 else src


def _unencodable(value: Any) -> str | None:
    """Where ``value`` holds a string (key or value) that is not valid UTF-8 text, else None.

    JSON escapes can spell lone surrogates (``"\\ud800"``), which Python strings hold but UTF-8
    cannot; tokenizers and file systems fail on them. Iterative: no recursion on deep input.
    """
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{e.reason} ({brief(node[e.start : e.end])} at character {e.start})"
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return None


def parse_record(element: dict[str, Any]) -> dict[str, Any]:
    """Decodes a source element's ``raw`` field into a JSON object and checks its text.

    Raises:
      SampleSkipped: ``bad_text_encoding`` (not UTF-8, or a string UTF-8 cannot encode, e.g. a
        lone surrogate) or ``bad_record`` (invalid or hostile JSON: nested over 64 levels,
        duplicate keys, NaN; or not a JSON object).
    """
    raw = element["raw"]
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleSkipped("bad_text_encoding", str(e)) from None
        try:
            raw = parse_json(text, "manifest line", InputError)
        except InputError as e:
            raise SampleSkipped("bad_record", str(e)) from None
    if not isinstance(raw, dict):
        raise SampleSkipped("bad_record", f"expected a JSON object, got {type(raw).__name__}")
    problem = _unencodable(raw)
    if problem is not None:
        raise SampleSkipped("bad_text_encoding", f"a string is not UTF-8 text: {problem}")
    return raw


def resolve_media(root: Path, rel: Any) -> Path:
    """Resolves a manifest media path under ``root``, refusing anything that escapes it.

    The check is lexical (absolute paths and ``..`` that climb out are refused): symlinks inside the
    root are the data owner's choice (e.g. ``root/videos -> /mnt/nfs/videos``) and are followed.

    Raises:
      SampleSkipped: ``bad_record`` (not a string), ``path_outside_root``, ``missing_file`` or
        ``not_regular_file`` (a FIFO, device or directory).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise SampleSkipped(
            "bad_record", f"media path must be a non-empty string without NUL, got {brief(rel)}"
        )
    root = Path(os.path.abspath(root))
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root):
        raise SampleSkipped("path_outside_root", f"{brief(rel)} resolves outside {root}")
    try:
        mode = path.stat().st_mode  # follows links, as the docstring says
    except FileNotFoundError:
        raise SampleSkipped("missing_file", str(path)) from None
    except OSError as e:  # e.g. a name over the file system's length limit, a link loop
        raise SampleSkipped("missing_file", f"{brief(str(path))}: {e.strerror}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the decoder forever
        raise SampleSkipped("not_regular_file", f"{path} is not a regular file")
    return path


__all__ = [
    "GroupedSource",
    "ManifestError",
    "ManifestSource",
    "detect_format",
    "file_fingerprint",
    "open_source",
    "parse_record",
    "resolve_media",
]
