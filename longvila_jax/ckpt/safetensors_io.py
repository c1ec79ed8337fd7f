"""Validating safetensors reader and streaming writer (never pickle).

The reader parses the format itself instead of trusting a library: an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` and
a data section. Every entry is validated before any tensor is read (known dtype, non-negative
shape, offsets inside the data section, spans that tile the data section without gaps or
overlaps, ``prod(shape) * itemsize == span`` in exact integer arithmetic), because public
proofs of concept exploit exactly these fields (header bloat, shape-product overflow). Tensors
are read one at a time with ``seek`` + ``readinto`` into a fresh buffer, so nothing stays mapped.

Every file is opened through ``safe_paths.open_regular`` (a FIFO named ``model.safetensors``
is refused instead of hanging the import; with ``root``, a symlink out of the source folder is
refused, Hugging Face hub-cache blobs excepted), and the header and index JSON go through the
checked loader (duplicate keys, NaN constants and deep nesting are refused).

The matching writer is ``safetensors_writer``.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from longvila_jax.core.errors import CheckpointError, brief
from longvila_jax.core.safe_load import MAX_CONFIG_BYTES, parse_json
from longvila_jax.core.safe_paths import check_name, open_regular, read_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ENTRIES = 65536
MAX_NDIM = 16
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
    # Depth 4 covers {name: {"shape": [...]}}; a duplicate key would let readers disagree.
    header = parse_json(raw, f"{where}: header is not valid JSON", CheckpointError, max_depth=4)
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    if len(header) > MAX_ENTRIES:
        raise CheckpointError(f"{where}: {len(header)} tensors exceed the cap of {MAX_ENTRIES}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        at = f"{where}: tensor {brief(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{at}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{at}: unsupported dtype {brief(dtype)}")
        # A rank cap keeps the shape product cheap (a megabyte-long shape list would not be).
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CheckpointError(
                f"{at}: shape must be a list of at most {MAX_NDIM} non-negative ints, got "
                f"{brief(shape)}"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{at}: data_offsets must be two ints, got {brief(offsets)}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                f"{at}: data_offsets {brief(offsets)} outside the data section of {data_len} bytes"
            )
        # Python ints do not overflow, so a huge shape product cannot wrap around to the span.
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if expected != end - start:
            raise CheckpointError(
                f"{at}: shape {brief(shape)} x {dtype} needs {expected} bytes but data_offsets "
                f"span {end - start}"
            )
        # An empty tensor passes the span check with any other dimensions; numpy needs their
        # product to fit in an int64.
        if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize >= 1 << 62:
            raise CheckpointError(f"{at}: shape {brief(shape)} is too large")
        infos[name] = TensorInfo(name, dtype, tuple(shape), start, end)
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < pos:
            raise CheckpointError(
                f"{where}: tensor {brief(info.name)} overlaps the previous tensor"
            )
        if info.start > pos:
            raise CheckpointError(f"{where}: gap of unreferenced bytes before {brief(info.name)}")
        pos = info.end
    if pos != data_len:
        raise CheckpointError(f"{where}: {data_len - pos} trailing bytes not covered by tensors")
    return infos, metadata


class SafetensorsFile:
    """A validated safetensors file; ``read(name)`` loads one tensor into a fresh numpy array.

    Args:
      path: the ``.safetensors`` file.
      root: the source folder: a symlink of ``path`` must stay inside it (hub-cache blobs
        excepted); None checks only that the file is regular.
    """

    def __init__(self, path: str | Path, root: str | Path | None = None):
        self.path = Path(path)
        self.root = root
        if self.path.suffix != ".safetensors":
            raise CheckpointError(f"{self.path}: not a .safetensors file")
        # One open: the type and size are those of the descriptor we read (no stat/open race).
        with open_regular(self.path, "safetensors file", CheckpointError, root=root) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
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
        self._identity = (st.st_dev, st.st_ino, size)
        self.data_start = 8 + n
        self.tensors, self.metadata = _parse_header(self.path, raw, size - self.data_start)

    @property
    def names(self) -> list[str]:
        """Tensor names in file (offset) order."""
        return [i.name for i in sorted(self.tensors.values(), key=lambda i: i.start)]

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {brief(name)}")
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Returns tensor ``name`` as a new numpy array of its stored shape and dtype.

        Raises:
          CheckpointError: the file is no longer the one whose header was validated (replaced,
            resized, turned into a FIFO or a link out of the source) or the tensor is short.
        """
        info = self.info(name)
        out = aligned_empty(info.shape, info.np_dtype)
        with open_regular(self.path, "safetensors file", CheckpointError, root=self.root) as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino, st.st_size) != self._identity:
                raise CheckpointError(f"{self.path}: file changed after its header was checked")
            f.seek(self.data_start + info.start)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {brief(name)} truncated ({got}/{info.nbytes})"
            )
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

    ``index`` is the verbatim index file name (``model.safetensors.index.json``) or None, and
    ``index_text`` its text as read (export reproduces it byte for byte).
    Files not referenced by the index, and pickle files next to the safetensors, are ignored.

    Args:
      directory: the model folder.
      root: the source tree the folder belongs to (default: the folder itself); symlinks of
        the weight and index files must stay inside it (hub-cache blobs excepted).
    """

    def __init__(self, directory: str | Path, root: str | Path | None = None):
        self.directory = Path(directory)
        self.root = Path(root) if root is not None else self.directory
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        refuse_pickles(self.directory)
        indexes = sorted(p for p in self.directory.iterdir() if p.name.endswith(INDEX_SUFFIX))
        self.index: str | None = None
        self.index_text: str | None = None
        self.index_metadata: dict = {}
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if len(indexes) > 1:
            names = [brief(p.name) for p in indexes[:4]]
            raise CheckpointError(f"{self.directory}: several index files {names}")
        if indexes:
            self._load_index(indexes[0])
        else:
            found = sorted(self.directory.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"{self.directory}: expected one .safetensors file or an index, "
                    f"found {brief([p.name for p in found])}"
                )
            st = SafetensorsFile(found[0], self.root)
            self.files[found[0].name] = st
            self.where = {n: found[0].name for n in st.names}

    def _load_index(self, path: Path) -> None:
        self.index = path.name
        raw = read_regular(
            path, "index", CheckpointError, max_bytes=MAX_CONFIG_BYTES, root=self.root
        )
        data = parse_json(raw, f"{path}: index", CheckpointError)
        self.index_text = raw.decode("utf-8")  # parse_json checked it is UTF-8
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{path}: missing or empty weight_map")
        meta = data.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{path}: metadata must be an object, not {brief(meta)}")
        self.index_metadata = meta or {}
        for name, fname in wmap.items():
            if not isinstance(fname, str):
                raise CheckpointError(
                    f"{path}: weight_map[{brief(name)}] is {brief(fname)}, not a file name"
                )
        fnames = sorted(set(wmap.values()))
        if len(fnames) > MAX_ENTRIES:
            raise CheckpointError(f"{path}: {len(fnames)} weight files exceed the cap")
        for fname in fnames:
            try:
                check_name(fname, "weight_map file")
            except CheckpointError:
                raise CheckpointError(
                    f"{path}: weight_map file {brief(fname)} is not a plain name"
                ) from None
            fpath = self.directory / fname
            if not os.path.lexists(fpath):
                raise CheckpointError(f"{path}: referenced file {fname!r} does not exist")
            self.files[fname] = SafetensorsFile(fpath, self.root)
        seen: dict[str, str] = {}
        for fname, st in self.files.items():
            for name in st.names:
                if name in seen:
                    raise CheckpointError(
                        f"{self.directory}: tensor {brief(name)} appears in {seen[name]} and "
                        f"{fname}"
                    )
                seen[name] = fname
        for name, fname in wmap.items():
            if seen.get(name) != fname:
                raise CheckpointError(
                    f"{path}: tensor {brief(name)} is mapped to {fname} but "
                    + (f"stored in {seen[name]}" if name in seen else "not stored there")
                )
        extra = sorted(set(seen) - set(wmap))
        if extra:
            raise CheckpointError(
                f"{path}: tensor {brief(extra[0])} is stored but not in weight_map"
            )
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
            raise CheckpointError(f"{self.directory}: no tensor {brief(name)}")
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
