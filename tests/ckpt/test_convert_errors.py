"""Every malformed input of the converter fails naming the tensor/field and leaves no output.

Each case copies one good tiny VILA checkpoint, breaks exactly one thing, and runs the import.
Besides the error message, every case checks that neither the output directory nor a temporary
sibling remains. Pickles are planted with a payload that would create a canary file if it were
ever unpickled; the canary must never appear.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import vila_fixture as vf

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.safetensors_io import CheckpointError
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.config.base import ConfigError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return vf.build_vila(tmp_path_factory.mktemp("good") / "vila", vf.Spec(layers=1, v_layers=2))


@pytest.fixture
def src(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "src"))


def _import_fails(src: Path, exc, match: str, overrides=()):
    out = src.parent / "out"
    with pytest.raises(exc, match=match) as e:
        import_vila(src, out, overrides=overrides)
    assert not out.exists()
    assert [p.name for p in src.parent.iterdir()] == ["src"]  # no temp dir left either
    return e.value


def _edit_header(path: Path, fn) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, fn) -> None:
    tensors = safetensors.numpy.load_file(path)
    fn(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


VISION = "vision_tower/model.safetensors"
PROJ = "mm_projector/model.safetensors"


def _set_offsets(name, offsets):
    def fn(h):
        h[name]["data_offsets"] = offsets

    return fn


def test_bad_offsets(src):
    name = "vision_model.embeddings.patch_embedding.bias"
    _edit_header(src / VISION, _set_offsets(name, [0, 10**9]))
    e = _import_fails(src, CheckpointError, "outside the data section")
    assert name in str(e) and "model.safetensors" in str(e)


def test_overlapping_offsets(src):
    def fn(h):
        entries = sorted(
            (k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0]
        )
        a, b = entries[0], entries[1]
        start = h[a]["data_offsets"][0]
        span = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + span]

    _edit_header(src / PROJ, fn)
    _import_fails(src, CheckpointError, "overlaps")


def test_shape_times_dtype_not_span(src):
    def fn(h):
        h["layers.2.bias"]["shape"] = [h["layers.2.bias"]["shape"][0] + 1]

    _edit_header(src / PROJ, fn)
    _import_fails(src, CheckpointError, r"'layers.2.bias'.*needs")


def test_oversized_header(src):
    path = src / PROJ
    path.write_bytes(struct.pack("<Q", 101 * 1024 * 1024) + path.read_bytes()[8:])
    _import_fails(src, CheckpointError, "exceeds the .* byte cap")


def test_header_not_json(src):
    path = src / PROJ
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"#" * n + raw[8 + n :])
    _import_fails(src, CheckpointError, "not valid JSON")


def test_missing_tensor(src):
    index = src / "llm" / "model.safetensors.index.json"
    wmap = json.loads(index.read_text())["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(src / "llm" / wmap[name], lambda t: t.pop(name))
    _edit_json(index, lambda d: d["weight_map"].pop(name))
    _import_fails(src, CheckpointError, f"missing tensor '{name}'")


def test_extra_tensor(src):
    _edit_tensors(src / PROJ, lambda t: t.update({"layers.9.weight": np.zeros(3, np.float32)}))
    _import_fails(src, CheckpointError, "unexpected tensor 'layers.9.weight'")


def test_shape_mismatch(src):
    _edit_tensors(src / PROJ, lambda t: t.update({"layers.4.weight": np.zeros((64, 32), "f4")}))
    _import_fails(src, CheckpointError, r"'layers.4.weight' has shape \[64, 32\].*\[64, 64\]")


def test_vocab_config_vs_embedding(src):
    _edit_json(src / "llm" / "config.json", lambda d: d.update(vocab_size=90))
    e = _import_fails(src, ConfigError, "embed_tokens has 96 rows")
    assert e.field == "llm.vocab_size"


def test_tokenizer_larger_than_vocab_with_non_media_tokens(src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src / "llm")
    tok.add_tokens(["zz_new_word"])
    tok.save_pretrained(src / "llm")
    e = _import_fails(src, ConfigError, "zz_new_word")
    assert e.field == "llm.vocab_size"


def test_heads_top_level_vs_llm_config(src):
    _edit_json(src / "config.json", lambda d: d["llm_cfg"].update(num_attention_heads=8))
    e = _import_fails(src, ConfigError, "top-level config says 8")
    assert e.field == "llm_cfg.num_attention_heads"


def test_kv_heads_vs_tensor_shapes(src):
    for p, key in ((src / "llm" / "config.json", None), (src / "config.json", "llm_cfg")):
        _edit_json(p, lambda d, k=key: (d[k] if k else d).update(num_key_value_heads=1))
    e = _import_fails(src, ConfigError, "k_proj output")
    assert e.field == "llm.num_key_value_heads"


def test_hidden_size_top_level_vs_llm(src):
    _edit_json(src / "config.json", lambda d: d.update(hidden_size=128))
    assert _import_fails(src, ConfigError, "128").field == "hidden_size"


def test_mm_hidden_size_vs_vision_tower(src):
    _edit_json(src / "config.json", lambda d: d.update(mm_hidden_size=48))
    assert _import_fails(src, ConfigError, "48").field == "mm_hidden_size"


def test_image_token_id_vs_tokenizer(src):
    e = _import_fails(src, ConfigError, "tokenizer's <image> is 94", ["image_token_id=7"])
    assert e.field == "image_token_id"


def test_tokenizer_without_image_token(src):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / "llm" / name).unlink()
    vf.make_tokenizer(96, media=False).save_pretrained(src / "llm")
    e = _import_fails(src, ConfigError, "no <image> token")
    assert e.field == "image_token_id"


def test_unknown_projector_type(src):
    # The nonexistent type named by longvila/train/5_long_sft_256frames.sh.
    _edit_json(
        src / "mm_projector" / "config.json",
        lambda d: d.update(mm_projector_type="mlp_downsample_fix"),
    )
    _edit_json(src / "config.json", lambda d: d.pop("mm_projector_cfg"))
    assert _import_fails(src, ConfigError, "mlp_downsample_fix").field == "projector.type"


class _Canary:
    """Unpickling this creates the canary file (what a malicious checkpoint would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _plant(path: Path, canary: Path) -> None:
    path.write_bytes(pickle.dumps(_Canary(canary)))


def test_pickle_only_weights_refused_and_never_opened(src, tmp_path):
    canary = tmp_path / "canary"
    (src / PROJ).unlink()
    _plant(src / "mm_projector" / "pytorch_model.bin", canary)
    _import_fails(src, CheckpointError, "pytorch_model.bin.*never loaded")
    assert not canary.exists()


def test_planted_pickles_are_ignored_and_never_opened(src, tmp_path):
    canary = tmp_path / "canary"
    for rel in ("llm/pytorch_model.bin", "training_args.bin", "vision_tower/x.pt", "a.pkl"):
        _plant(src / rel, canary)
    # LongVILA-R1 style: a remote-code top-level config next to config_vila_style.json.
    (src / "config.json").rename(src / "config_vila_style.json")
    (src / "config.json").write_text(
        json.dumps({"model_type": "vila", "auto_map": {"AutoModel": "modeling_vila.VILAModel"}})
    )
    (src / "modeling_vila.py").write_text(f"open({str(canary)!r}, 'w')\n")
    import_vila(src, tmp_path / "out")
    assert not canary.exists()
    hf_files = orbax_io.read_provenance(tmp_path / "out")["hf_files"]
    assert not [f for f in hf_files if f.endswith((".bin", ".pt", ".pkl"))]
    assert orbax_io.read_provenance(tmp_path / "out")["source"]["top_file"] == (
        "config_vila_style.json"
    )


def test_existing_output_is_never_touched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        import_vila(src, out)
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_failure_while_writing_leaves_nothing(src, monkeypatch):
    calls = []

    def boom(self, component, path, value):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(orbax_io.ParamWriter, "save", boom)
    _import_fails(src, OSError, "disk full")
