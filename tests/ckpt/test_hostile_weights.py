"""Tampered weights in a source checkpoint: refused at import, naming the file and tensor.

Cases: an integer dtype over float data (same width, so every byte check passes), duplicate
keys in a safetensors header or an index (``json.loads`` would keep the last silently), a
non-string ``weight_map`` value, and NaN/Inf weights (refused unless explicitly allowed, then
accepted with a warning) on every path that reads weights for a model: ``import_vila``,
``import_hf_parts``, ``read_vila_params`` and the ``--allow-nonfinite`` CLI flag.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import vila_fixture as vf
from helpers.hostile import edit_json

from longvila_jax.ckpt.hf_parts_import import import_hf_parts
from longvila_jax.ckpt.pretrained import load_pretrained, read_vila_params
from longvila_jax.ckpt.safetensors_io import SafetensorsFile, WeightSet
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.convert import main
from longvila_jax.core.errors import CheckpointError

PROJ = "mm_projector/model.safetensors"
INDEX = "llm/model.safetensors.index.json"
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return vf.build_vila(tmp_path_factory.mktemp("weights") / "vila", vf.Spec(layers=1, v_layers=2))


@pytest.fixture
def src(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "src"))


def _refused(fn, out: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as e:
        fn()
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["src"]  # no temp dir either
    return e.value


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_integer_dtype_over_float_data_is_refused(src):
    header, data = _header(src / PROJ)
    name = "layers.1.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"  # same width: offsets and sizes all still agree
    _write(src / PROJ, json.dumps(header), data)
    out = src.parent / "out"
    e = _refused(lambda: import_vila(src, out), out, f"'{name}'.*dtype I32")
    assert "model.safetensors" in str(e) and "floating" in str(e)


def test_duplicate_header_key_is_refused(src):
    header, data = _header(src / PROJ)
    name = "layers.1.weight"
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    _write(src / PROJ, text[:-1] + ", " + entry + "}", data)  # the same entry twice
    out = src.parent / "out"
    e = _refused(lambda: import_vila(src, out), out, f"duplicate key '{name}'")
    assert "mm_projector/model.safetensors: header" in str(e)


def test_duplicate_index_key_is_refused(src):
    path = src / INDEX
    text = path.read_text()
    wmap = json.loads(text)["weight_map"]
    other = sorted(set(wmap.values()) - {wmap[NORM]})[0]
    path.write_text(text.replace('"weight_map": {', f'"weight_map": {{"{NORM}": "{other}", ', 1))
    e = _refused(lambda: WeightSet(src / "llm"), src.parent / "out", f"duplicate key '{NORM}'")
    assert "model.safetensors.index.json" in str(e)


@pytest.mark.parametrize("value", [3, None, ["x.safetensors"], {"a": 1}])
def test_non_string_weight_map_value_is_named(src, value):
    edit_json(src / INDEX, lambda d: d["weight_map"].update({NORM: value}))
    out = src.parent / "out"
    e = _refused(lambda: import_vila(src, out), out, rf"weight_map\['{NORM}'\]")
    assert "not a file name" in str(e) and "index.json" in str(e)


def _poison(path: Path, name: str, value: float = np.nan) -> None:
    tensors = safetensors.numpy.load_file(path)
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[1] = value
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _llm_file(src: Path, name: str) -> Path:
    return src / "llm" / json.loads((src / INDEX).read_text())["weight_map"][name]


def test_nonfinite_weights_refused_at_import_unless_allowed(src, caplog):
    _poison(_llm_file(src, NORM), NORM, np.inf)
    out = src.parent / "out"
    e = _refused(lambda: import_vila(src, out), out, f"tensor '{NORM}': 1 of 64 values")
    assert "--allow-nonfinite" in str(e) and "model-0000" in str(e)
    _refused(lambda: read_vila_params(src), out, f"'{NORM}'.*NaN or Inf")
    with caplog.at_level("WARNING"):
        import_vila(src, out, allow_nonfinite=True)
    assert NORM in caplog.text and "allow_nonfinite" in caplog.text
    # The accepted checkpoint is still refused where a model is built from it.
    with pytest.raises(CheckpointError, match="parameter llm/norm/scale: holds NaN"):
        load_pretrained(out)


def test_nonfinite_in_hf_parts_import(src):
    # Plain HF parts: the fixture's llm/ and vision_tower/ are ordinary HF model folders.
    name = "model.layers.0.mlp.up_proj.weight"
    _poison(_llm_file(src, name), name)
    out = src.parent / "out"
    e = _refused(
        lambda: import_hf_parts(
            src / "llm", src / "vision_tower", out, projector_type="mlp_downsample"
        ),
        out,
        f"tensor '{name}'",
    )
    assert "NaN or Inf" in str(e)


def test_cli_allow_nonfinite_flag(src, capsys):
    _poison(src / PROJ, "layers.1.bias")
    out = src.parent / "out"
    assert main(["import", "--vila", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "'layers.1.bias'" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["import", "--vila", str(src), "--out", str(out), "--allow-nonfinite"]) == 0
    assert out.is_dir()


def test_file_swapped_after_its_header_was_checked(src):
    st = SafetensorsFile(src / PROJ)
    tensors = safetensors.numpy.load_file(src / PROJ)
    tensors["extra"] = np.zeros(4, np.float32)
    safetensors.numpy.save_file(tensors, src / PROJ)
    with pytest.raises(CheckpointError, match="changed after its header was checked"):
        st.read("layers.1.bias")
