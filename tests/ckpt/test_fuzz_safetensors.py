"""Fuzz: safetensors headers (``SafetensorsFile``, ``_parse_header``) and sharded index files
(``WeightSet``).

File cases start from a valid four-tensor file (one of them empty) and mutate the JSON header
(one tensor's dtype, shape or data_offsets replaced: huge, negative, 70 dims, wrong types;
structured edits anywhere incl. ``__metadata__``; raw-text edits incl. duplicate keys), the
8-byte length prefix, the data section's length, or the raw bytes of the whole file;
``_parse_header`` also gets the header with a random data-section length. A file that parses
must also read every tensor. Index cases mutate ``model.safetensors.index.json`` of a valid
two-shard folder; a set that loads must read every tensor and describe its plan. Both must
refuse what the checked JSON loader refuses (duplicate keys, NaN, nesting over 64 levels).
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers.fuzz_mutations import FUZZ, HUGE_INTS, Vocab, ints, pick, values
from helpers.fuzz_outcome import checked_loader_refusal, outcome
from helpers.fuzz_texts import JSON_VALUES, byte_edits, json_inputs, json_lines, json_text
from hypothesis import given
from hypothesis import strategies as st

from longvila_jax.ckpt.safetensors_io import (
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsFile,
    WeightSet,
    _parse_header,
)

TENSORS = {  # name: (dtype, shape)
    "a.weight": ("F32", [2, 3]),
    "b.bias": ("BF16", [4]),
    "c.empty": ("I8", [0, 5]),
    "d.mask": ("BOOL", [3]),
}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
VOCAB = Vocab(
    keys=("dtype", "shape", "data_offsets", "__metadata__", "format", *TENSORS),
    values=(*DTYPES, "F8_E4M3", "bf16", "pt", "np", [0, 0], [0, 24], [-1, 4], [24, 0], [2**64, 0])
    + ([2**63, 2], [0] * 40, [1] * 70, *SHARDS, INDEX, "missing.safetensors", "sub/x.safetensors"),
)


def header_and_data(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    data = b""
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((len(data) + i) % 3 for i in range(n))  # BOOL bytes stay 0/1/2
    return header, data


def file_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


HEADER, DATA = header_and_data(TENSORS, {"format": "pt"})
INDEX_DOC = {
    "metadata": {"total_size": len(DATA)},
    "weight_map": dict(zip(TENSORS, (SHARDS[0], SHARDS[0], SHARDS[1], SHARDS[1]), strict=True)),
}
PREFIXES = (0, 1, 7, 8, 2**31, 2**32 - 1, 2**63, 2**64 - 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1)


DIMS = st.one_of(st.integers(-2, 2**70), st.sampled_from(HUGE_INTS))
FIELD_VALUES = {
    "dtype": st.one_of(st.sampled_from(VOCAB.values), values(VOCAB)),
    "shape": st.one_of(  # with a 0 the tensor is empty: any other dims fit an empty span
        st.lists(DIMS, max_size=70),
        st.lists(DIMS, max_size=70).map(lambda d: [*d, 0]),
        values(VOCAB),
    ),
    "data_offsets": st.one_of(st.lists(DIMS, max_size=3), values(VOCAB)),
}


LENGTHS = st.one_of(  # (delta,): the true length plus delta
    st.integers(-500, 64).map(lambda d: (d,)),
    st.sampled_from(PREFIXES),
    st.integers(0, 2**64 - 1),
)
TAILS = st.binary(max_size=16)
DATA_LENS = st.one_of(st.none(), st.sampled_from(PREFIXES), st.integers(0))


@st.composite
def header_entries(draw) -> bytes:
    """The valid header with one tensor's dtype, shape or data_offsets replaced."""
    doc = copy.deepcopy(HEADER)
    name = pick(draw, list(TENSORS))
    field = pick(draw, sorted(FIELD_VALUES))
    doc[name][field] = draw(FIELD_VALUES[field])
    return draw(json_text(doc))


@st.composite
def safetensors_cases(draw) -> tuple[bytes, bytes, int]:
    """(file bytes, header bytes, data length claimed) for one mutated file."""
    kind = pick(draw, ("entry", "header", "prefix", "data", "bytes"))
    raw = json.dumps(HEADER).encode()
    if kind == "entry":
        raw = draw(header_entries())
    elif kind == "header":
        raw = draw(json_inputs(HEADER, VOCAB))
    data = DATA
    length = len(raw)
    if kind == "prefix":
        length = draw(LENGTHS)
        length = max(0, len(raw) + length[0]) if isinstance(length, tuple) else length
    elif kind == "data":
        data = DATA[: draw(ints(0, len(DATA)))] + draw(TAILS)
    blob = file_bytes(raw, data, length)
    if kind == "bytes":
        blob = draw(byte_edits(blob, JSON_VALUES, json_lines(VOCAB)))
    data_len = draw(DATA_LENS)
    data_len = len(data) if data_len is None else data_len
    return blob, raw, data_len


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return setup(tmp_path_factory.mktemp("fuzz_safetensors"))


def setup(root: Path) -> Path:
    """A scratch file path and a valid two-shard folder with an index under ``root``."""
    shard = root / "shards"
    shard.mkdir()
    for fname in SHARDS:
        part = [n for n, f in INDEX_DOC["weight_map"].items() if f == fname]
        header, data = header_and_data({n: TENSORS[n] for n in part})
        (shard / fname).write_bytes(file_bytes(header, data))
    return root


def check_file(root: Path, case: tuple[bytes, bytes, int]) -> None:
    blob, raw, data_len = case
    path = root / "w.safetensors"
    path.write_bytes(blob)
    names = (path.name,)
    if outcome(lambda: _parse_header(path, raw, data_len), names) is not None:
        refusal = checked_loader_refusal(raw)
        assert refusal is None, f"accepted a header the checked loader refuses: {refusal}"
    st_file = outcome(lambda: SafetensorsFile(path), names)
    if st_file is None:
        return
    (n,) = struct.unpack("<Q", blob[:8])
    refusal = checked_loader_refusal(blob[8 : 8 + n])
    assert refusal is None, f"accepted a header the checked loader refuses: {refusal}"
    for name in st_file.names:
        info = st_file.info(name)
        arr = outcome(lambda n=name: st_file.read(n), names)
        assert arr is not None, f"{name}: a validated tensor does not read"
        assert arr.shape == info.shape and arr.nbytes == info.nbytes


def check_index(root: Path, index: bytes) -> None:
    shard = root / "shards"
    (shard / INDEX).write_bytes(index)
    ws = outcome(lambda: WeightSet(shard), (shard.name, INDEX))
    if ws is None:
        return
    refusal = checked_loader_refusal(index)
    assert refusal is None, f"accepted an index the checked loader refuses: {refusal}"
    for name in ws.names:
        assert ws.read(name).nbytes == ws.info(name).nbytes
    json.dumps(ws.plan())


@FUZZ
@given(case=safetensors_cases())
def test_safetensors_file_mutations(workdir, case):
    check_file(workdir, case)


def index_cases() -> st.SearchStrategy:
    return json_inputs(INDEX_DOC, VOCAB)


@FUZZ
@given(index=index_cases())
def test_safetensors_index_mutations(workdir, index):
    check_index(workdir, index)
