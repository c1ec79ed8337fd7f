"""Our safetensors reader/writer: compatibility with the reference library and every rejection.

Malformed files are hand-built byte strings, so each test controls exactly one broken field.
Each rejection must name the file and (where there is one) the tensor.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from longvila_jax.ckpt.safetensors_io import (
    MAX_ENTRIES,
    CheckpointError,
    SafetensorsFile,
    WeightSet,
)
from longvila_jax.ckpt.safetensors_writer import SafetensorsWriter, write_tensors


def _raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def test_reads_reference_library_files_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
        "d": np.array([True, False]),
        "e": rng.standard_normal((4,)).astype(np.float16),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt"}
    assert sorted(st.names) == sorted(tensors)
    for name, want in tensors.items():
        got = st.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def test_writer_output_loads_in_reference_library_and_shards(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal((64, 16)).astype(np.float32) for i in range(5)}
    tensors["bf"] = rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16)
    plan = write_tensors(tmp_path, tensors, max_shard_bytes=2 * 64 * 16 * 4)
    names = [f["name"] for f in plan["files"]]
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    loaded = {}
    for n in names:
        loaded.update(safetensors.numpy.load_file(tmp_path / n))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].tobytes() == v.tobytes() and loaded[k].dtype == v.dtype
    ws = WeightSet(tmp_path)
    assert ws.index == "model.safetensors.index.json"
    assert ws.read("t3").tobytes() == tensors["t3"].tobytes()
    assert not list(tmp_path.glob("*.partial"))


BAD_FILES = {
    "offset past the data section": (
        {"w": _entry("F32", [2], 0, 16)},
        bytes(8),
        "outside the data section",
    ),
    "overlapping offsets": (
        {"w": _entry("F32", [2], 0, 8), "v": _entry("F32", [2], 4, 12)},
        bytes(12),
        "overlaps",
    ),
    "shape x dtype != span": (
        {"w": _entry("F32", [3], 0, 8)},
        bytes(8),
        "needs 12 bytes",
    ),
    "overflowing shape product": (
        {"w": _entry("F32", [2**62, 2**62, 16], 0, 0)},
        b"",
        "needs",
    ),
    "gap between tensors": (
        {"w": _entry("F32", [1], 0, 4), "v": _entry("F32", [1], 8, 12)},
        bytes(12),
        "gap",
    ),
    "trailing bytes": ({"w": _entry("F32", [1], 0, 4)}, bytes(8), "trailing"),
    "unknown dtype": ({"w": _entry("F8_E9M0", [1], 0, 1)}, bytes(1), "unsupported dtype"),
    "negative dimension": ({"w": _entry("F32", [-1], 0, 0)}, b"", "non-negative"),
    "reversed offsets": ({"w": _entry("F32", [0], 4, 0)}, bytes(4), "outside"),
    "extra entry key": (
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}},
        bytes(4),
        "exactly",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_header_rejected_naming_file_and_tensor(tmp_path, case):
    header, data, message = BAD_FILES[case]
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(e.value)
    if case not in ("gap between tensors", "trailing bytes", "overlapping offsets"):
        assert "'w'" in str(e.value)


def test_header_not_json(tmp_path):
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(_raw(tmp_path / "x.safetensors", b"{not json" + b" " * 7))


def test_oversized_header_rejected_without_reading_it(tmp_path):
    path = _raw(tmp_path / "big.safetensors", b"{}", length=200 * 1024 * 1024)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="exceeds the .* byte cap"):
        SafetensorsFile(path)
    assert time.perf_counter() - t0 < 2.0


def test_header_length_beyond_file(tmp_path):
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        SafetensorsFile(_raw(tmp_path / "short.safetensors", b"{}", length=1000))


def test_too_many_entries(tmp_path):
    header = {f"t{i}": _entry("U8", [0], 0, 0) for i in range(MAX_ENTRIES + 1)}
    with pytest.raises(CheckpointError, match="exceed the cap"):
        SafetensorsFile(_raw(tmp_path / "many.safetensors", header))


def test_truncated_file_reports_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"w": np.ones(16, np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="trailing|outside"):
        SafetensorsFile(path)


def _shards(tmp_path: Path) -> Path:
    write_tensors(tmp_path, {f"t{i}": np.full((4,), i, np.float32) for i in range(4)}, 32)
    return tmp_path


def test_index_missing_file(tmp_path):
    d = _shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="'model-00002-of-00002.safetensors' does not exist"):
        WeightSet(d)


def test_index_tensor_in_two_files(tmp_path):
    d = _shards(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    write_tensors(d / "x", {"t0": np.zeros(4, np.float32)})
    (d / "x" / "model.safetensors").rename(d / "extra.safetensors")
    index["weight_map"]["t9"] = "extra.safetensors"  # extra.safetensors also stores t0
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'t0' appears in"):
        WeightSet(d)


def test_index_names_unstored_tensor(tmp_path):
    d = _shards(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost'"):
        WeightSet(d)


def test_index_path_traversal_refused(tmp_path):
    d = _shards(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["t0"] = "../model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain name"):
        WeightSet(d)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "w.pkl"])
def test_pickle_weights_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="never loaded"):
        WeightSet(tmp_path)


def test_writer_rejects_wrong_dtype_and_missing_tensor(tmp_path):
    w = SafetensorsWriter(tmp_path / "a.safetensors", [("x", "F32", [2]), ("y", "BF16", [2])])
    with pytest.raises(CheckpointError, match="'x' is float64"):
        w.write("x", np.zeros(2, np.float64))
    w.write("x", np.zeros(2, np.float32))
    with pytest.raises(CheckpointError, match="'y' never written"):
        w.close()
    assert not (tmp_path / "a.safetensors").exists()
    assert not list(tmp_path.iterdir())
