"""Streaming safetensors writer: HF-compatible single or sharded files with an index.

The writer takes the full tensor plan (names, dtypes, shapes, order) up front, writes the header,
then accepts tensors in any order and writes each at its offset. That lets the exporter stream
one (stacked) parameter at a time into several shard files. Output is HF compatible: the header
is compact JSON padded with spaces to a multiple of 8 bytes, as the reference implementation
writes it, and shards are named ``model-0000k-of-0000N.safetensors`` with a
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``). Each file is
written under a ``.partial`` name and renamed when complete.

The writers are the chokepoint for names that come from files (a checkpoint's provenance
names the shard files and the index): each name must be a plain file name, joined with
``safe_paths.join_inside``, and files are created exclusively without following links, so no
name can place a file outside the output directory or overwrite one there.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from longvila_jax.ckpt.safetensors_io import DTYPE_NAMES, DTYPES, CheckpointError, TensorInfo
from longvila_jax.core import faults
from longvila_jax.core.errors import brief
from longvila_jax.core.safe_paths import check_name, join_inside

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create(path: Path, what: str):
    """A new file at ``path`` (never an existing file, never through a link)."""
    try:
        return os.fdopen(os.open(path, _CREATE, 0o644), "wb")
    except FileExistsError:
        raise CheckpointError(f"{what}: {path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot create {path} ({e.strerror})") from None


def _target(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` for a plain file name (no sub-folder) that does not exist yet."""
    path = join_inside(directory, check_name(name, what), what)
    if os.path.lexists(path):
        raise CheckpointError(f"{what}: {path} already exists; refusing to overwrite it")
    return path


class SafetensorsWriter:
    """Writes one safetensors file whose tensor list is fixed up front; tensors in any order.

    Data goes to ``<path>.partial``, renamed to ``path`` by ``close()`` (atomic per file);
    ``abort()`` removes the partial file.
    """

    def __init__(
        self,
        path: str | Path,
        tensors: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ):
        path = Path(path)
        self.path = _target(path.parent, path.name, f"{path.parent}: file name")
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.infos: dict[str, TensorInfo] = {}
        pos = 0
        for name, dtype, shape in tensors:
            if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {brief(name)} has unsupported dtype {brief(dtype)}"
                )
            if name in self.infos:
                raise CheckpointError(f"{self.path}: duplicate tensor {brief(name)}")
            n = math.prod(shape) * DTYPES[dtype].itemsize
            self.infos[name] = TensorInfo(name, dtype, tuple(shape), pos, pos + n)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.pending = set(self.infos)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._f = _create(self._tmp, f"{self.path}")  # closed by close()/abort()
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self.data_start + pos)

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes tensor ``name``; its dtype and shape must match the plan exactly."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {brief(name)} is not in the file plan")
        if name not in self.pending:
            raise CheckpointError(f"{self.path}: tensor {brief(name)} written twice")
        if array.dtype != info.np_dtype or tuple(array.shape) != info.shape:
            raise CheckpointError(
                f"{self.path}: tensor {brief(name)} is {array.dtype}{list(array.shape)}, the plan "
                f"says {info.dtype}{list(info.shape)}"
            )
        self._f.seek(self.data_start + info.start)
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.pending.discard(name)

    def close(self) -> None:
        """Flushes the file; raises if a planned tensor was never written."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.pending:
            self._tmp.unlink(missing_ok=True)
            first = brief(sorted(self.pending)[0])
            raise CheckpointError(f"{self.path}: tensor {first} never written")
        os.replace(self._tmp, self.path)
        faults.hit("export_file")  # test kill point: one file complete

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def shard_plan(
    tensors: Sequence[tuple[str, str, Sequence[int]]], max_shard_bytes: int | None
) -> dict:
    """Splits tensors into HF-named shards (``model-0000k-of-0000N.safetensors`` + index).

    Args:
      tensors: (name, dtype code, shape) in the order to write.
      max_shard_bytes: shard size limit, or None for one ``model.safetensors``.

    Returns:
      A plan in the format of ``WeightSet.plan()``.
    """
    if max_shard_bytes is None:
        return {
            "index": None,
            "files": [
                {
                    "name": "model.safetensors",
                    "metadata": {"format": "pt"},
                    "tensors": [[n, d, list(s)] for n, d, s in tensors],
                }
            ],
        }
    groups: list[list] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append([name, dtype, list(shape)])
        size += n
    total = len(groups)
    return {
        "index": "model.safetensors.index.json",
        "files": [
            {
                "name": f"model-{i + 1:05d}-of-{total:05d}.safetensors",
                "metadata": {"format": "pt"},
                "tensors": g,
            }
            for i, g in enumerate(groups)
        ],
    }


def index_json(plan: Mapping, metadata: Mapping | None = None) -> str:
    """The HF index file text for ``plan`` (``metadata.total_size`` recomputed)."""
    meta = dict(metadata or {})
    meta["total_size"] = sum(
        math.prod(s) * DTYPES[d].itemsize for f in plan["files"] for _, d, s in f["tensors"]
    )
    wmap = {n: f["name"] for f in plan["files"] for n, _, _ in f["tensors"]}
    return json.dumps({"metadata": meta, "weight_map": dict(sorted(wmap.items()))}, indent=2) + "\n"


class PlanWriter:
    """Writes all files of a plan into ``directory``; ``write(name, array)`` in any order.

    File names come from the plan (possibly from a checkpoint's provenance): each must be a
    plain name that does not exist in ``directory`` yet.
    """

    def __init__(self, directory: str | Path, plan: Mapping, index_text: str | None = None):
        self.directory = Path(directory)
        self.writers: dict[str, SafetensorsWriter] = {}
        self.owner: dict[str, str] = {}
        self._index: Path | None = None
        try:
            for i, f in enumerate(plan["files"]):
                path = _target(self.directory, f["name"], f"{self.directory}: plan file {i}")
                if f["name"] in self.writers:
                    raise CheckpointError(f"{path}: listed twice in the file plan")
                w = SafetensorsWriter(path, f["tensors"], f["metadata"])
                self.writers[f["name"]] = w
                self.owner.update({n: f["name"] for n in w.infos})
            if plan.get("index"):
                path = _target(self.directory, plan["index"], f"{self.directory}: index file")
                text = index_text if index_text is not None else index_json(plan)
                with _create(path, f"{self.directory}: index file") as fout:
                    self._index = path
                    fout.write(text.encode("utf-8"))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: np.ndarray) -> None:
        if name not in self.owner:
            raise CheckpointError(f"{self.directory}: tensor {brief(name)} is not in the file plan")
        self.writers[self.owner[name]].write(name, array)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if self._index is not None:
            self._index.unlink(missing_ok=True)


def write_tensors(
    directory: str | Path,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int | None = None,
) -> dict:
    """Writes in-memory tensors as HF safetensors (sharded when ``max_shard_bytes`` is set).

    Returns:
      The plan that was written.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    specs = [(n, DTYPE_NAMES[np.dtype(a.dtype)], a.shape) for n, a in items]
    plan = shard_plan(specs, max_shard_bytes)
    Path(directory).mkdir(parents=True, exist_ok=True)
    w = PlanWriter(directory, plan)
    try:
        for n, a in items:
            w.write(n, a)
    except BaseException:
        w.abort()
        raise
    w.close()
    return plan
