"""Validating safetensors reader and streaming writer (never pickle).

The reader parses the format itself instead of trusting a library: an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` and
a data section. Every entry is validated before any tensor is read (known dtype, non-negative
shape, offsets inside the data section, spans that tile the data section without gaps or
overlaps, ``prod(shape) * itemsize == span`` in exact integer arithmetic), because public
proofs of concept exploit exactly these fields (header bloat, shape-product overflow). Tensors
are read one at a time with ``seek`` + ``readinto`` into a fresh buffer, so nothing stays mapped.

The matching writer is ``safetensors_writer``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from longvila_jax.core.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ENTRIES = 65536
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def aligned_empty(shape: Sequence[int], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose buffer starts on an ``align``-byte boundary.

    XLA's CPU client aliases such buffers in ``jax.device_put`` instead of copying them, which
    saves one full copy of every parameter on the way to Orbax.
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n].view(dtype).reshape(shape)


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``dtype`` is the safetensors code (``"BF16"``); offsets are relative
    to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _parse_header(path: Path, raw: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict]:
    where = f"{path}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    if len(header) > MAX_ENTRIES:
        raise CheckpointError(f"{where}: {len(header)} tensors exceed the cap of {MAX_ENTRIES}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{at}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{at}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{at}: shape must be a list of non-negative ints, got {shape}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{at}: data_offsets must be two ints, got {offsets}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                f"{at}: data_offsets {offsets} outside the data section of {data_len} bytes"
            )
        # Python ints do not overflow, so a huge shape product cannot wrap around to the span.
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if expected != end - start:
            raise CheckpointError(
                f"{at}: shape {shape} x {dtype} needs {expected} bytes but data_offsets "
                f"span {end - start}"
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), start, end)
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < pos:
            raise CheckpointError(f"{where}: tensor {info.name!r} overlaps the previous tensor")
        if info.start > pos:
            raise CheckpointError(f"{where}: gap of unreferenced bytes before {info.name!r}")
        pos = info.end
    if pos != data_len:
        raise CheckpointError(f"{where}: {data_len - pos} trailing bytes not covered by tensors")
    return infos, metadata


class SafetensorsFile:
    """A validated safetensors file; ``read(name)`` loads one tensor into a fresh numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise CheckpointError(f"{self.path}: not a .safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{self.path}: header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte cap"
                )
            if 8 + n > size:
                raise CheckpointError(f"{self.path}: header length {n} exceeds the file size")
            raw = f.read(n)
        self.data_start = 8 + n
        self.tensors, self.metadata = _parse_header(self.path, raw, size - self.data_start)

    @property
    def names(self) -> list[str]:
        """Tensor names in file (offset) order."""
        return [i.name for i in sorted(self.tensors.values(), key=lambda i: i.start)]

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Returns tensor ``name`` as a new numpy array of its stored shape and dtype."""
        info = self.info(name)
        out = aligned_empty(info.shape, info.np_dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.start)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} truncated ({got}/{info.nbytes})")
        return out


def refuse_pickles(directory: Path) -> None:
    """Raises if ``directory`` holds pickle weights and no safetensors (pickles are never read)."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory}: only pickle-based weights ({', '.join(pickles)}); they are never "
            "loaded because unpickling can execute code. Convert them to safetensors first."
        )


class WeightSet:
    """The safetensors weights of one HF model folder (single file or sharded with an index).

    ``index`` is the verbatim index file name (``model.safetensors.index.json``) or None.
    Files not referenced by the index, and pickle files next to the safetensors, are ignored.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        refuse_pickles(self.directory)
        indexes = sorted(p for p in self.directory.iterdir() if p.name.endswith(INDEX_SUFFIX))
        self.index: str | None = None
        self.index_metadata: dict = {}
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if len(indexes) > 1:
            raise CheckpointError(f"{self.directory}: several index files {indexes}")
        if indexes:
            self._load_index(indexes[0])
        else:
            found = sorted(self.directory.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"{self.directory}: expected one .safetensors file or an index, "
                    f"found {[p.name for p in found]}"
                )
            st = SafetensorsFile(found[0])
            self.files[found[0].name] = st
            self.where = {n: found[0].name for n in st.names}

    def _load_index(self, path: Path) -> None:
        self.index = path.name
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{path}: missing or empty weight_map")
        self.index_metadata = data.get("metadata") or {}
        for fname in sorted(set(wmap.values())):
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise CheckpointError(f"{path}: weight_map file {fname!r} is not a plain name")
            fpath = self.directory / fname
            if not fpath.is_file():
                raise CheckpointError(f"{path}: referenced file {fname!r} does not exist")
            self.files[fname] = SafetensorsFile(fpath)
        seen: dict[str, str] = {}
        for fname, st in self.files.items():
            for name in st.names:
                if name in seen:
                    raise CheckpointError(
                        f"{self.directory}: tensor {name!r} appears in {seen[name]} and {fname}"
                    )
                seen[name] = fname
        for name, fname in wmap.items():
            if seen.get(name) != fname:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is mapped to {fname} but "
                    + (f"stored in {seen[name]}" if name in seen else "not stored there")
                )
        extra = sorted(set(seen) - set(wmap))
        if extra:
            raise CheckpointError(f"{path}: tensor {extra[0]!r} is stored but not in weight_map")
        self.where = {n: seen[n] for n in seen}

    @property
    def names(self) -> list[str]:
        return list(self.where)

    @property
    def is_subset(self) -> bool:
        """True after ``keep`` dropped tensors (the file layout is then not reproducible)."""
        return len(self.where) < sum(len(f.tensors) for f in self.files.values())

    def keep(self, predicate) -> None:
        """Restricts the set to the names for which ``predicate(name)`` is true.

        Used to take the vision tower out of a full SigLIP (vision + text) checkpoint.
        """
        self.where = {n: f for n, f in self.where.items() if predicate(n)}

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].info(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.directory}: no tensor {name!r}")
        return self.files[self.where[name]].read(name)

    def plan(self) -> dict:
        """The file layout, JSON-able: shard files in name order, tensors in offset order."""
        return {
            "index": self.index,
            "files": [
                {
                    "name": fname,
                    "metadata": st.metadata,
                    "tensors": [[n, st.info(n).dtype, list(st.info(n).shape)] for n in st.names],
                }
                for fname, st in sorted(self.files.items())
            ],
        }
