"""write_vila: a config-only model becomes a VILA layout that HF transformers and we load."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from longvila_jax.ckpt.fresh import write_vila
from longvila_jax.ckpt.pretrained import load_pretrained
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.config import ModelConfig, load_config
from longvila_jax.config.base import apply_overrides, to_dict
from longvila_jax.core.manifest import MANIFEST_FILE
from longvila_jax.data.synthetic import train_tokenizer
from longvila_jax.models.vlm import LongVILA

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["what number is shown in the video", "a red square"] * 4, out)
    return out


def _model(name: str, *overrides: str) -> LongVILA:
    raw = to_dict(load_config(ModelConfig, ROOT / "configs" / "model" / f"{name}.yaml"))
    cfg = apply_overrides(ModelConfig, raw, ["image_token_id=3", *overrides])
    with nnx.use_eager_sharding(False):
        return LongVILA(cfg, rngs=nnx.Rngs(7))


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_hf_loads_the_written_layout_with_equal_outputs(name, tokenizer_dir, tmp_path):
    model = _model(name)
    cfg = model.cfg
    out = write_vila(model, tokenizer_dir, tmp_path / "vila")
    hf_llm = tf.AutoModelForCausalLM.from_pretrained(
        out / "llm", attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = np.random.default_rng(0).integers(4, 200, size=(2, 11)).astype(np.int32)
    with torch.no_grad():
        ref = hf_llm(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(model.llm(jax.numpy.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-5

    tower = tf.SiglipVisionModel.from_pretrained(
        out / "vision_tower", attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert tower.config.num_hidden_layers == cfg.vision.num_hidden_layers
    px = (
        np.random.default_rng(1)
        .standard_normal((3, cfg.vision.image_size, cfg.vision.image_size, 3))
        .astype(np.float32)
    )
    with torch.no_grad():
        hs = tower(torch.from_numpy(px).permute(0, 3, 1, 2), output_hidden_states=True)
    ref_v = hs.hidden_states[cfg.vision.select_layer].numpy()
    assert np.abs(np.asarray(model.vision(jax.numpy.asarray(px))) - ref_v).max() <= 1e-5


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_import_round_trip_gives_identical_params_and_order(name, tokenizer_dir, tmp_path):
    model = _model(name)
    vila = write_vila(model, tokenizer_dir, tmp_path / "vila")
    assert not (vila / MANIFEST_FILE).exists()  # a VILA layout for PyTorch, not our checkpoint
    import_vila(vila, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / MANIFEST_FILE).is_file()
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.cfg.projector.token_order == model.cfg.projector.token_order
    assert loaded.cfg.image_token_id == 3
    a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    assert len(a) == len(b)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_row_major_llama_is_marked_and_col_major_qwen2_refused(tokenizer_dir, tmp_path):
    model = _model("tiny-llama", "projector.token_order=row_major")
    vila = write_vila(model, tokenizer_dir, tmp_path / "vila")
    import_vila(vila, tmp_path / "ckpt")
    assert load_pretrained(tmp_path / "ckpt").cfg.projector.token_order == "row_major"
    with pytest.raises(ValueError, match="token_order"):
        write_vila(
            _model("tiny-qwen2", "projector.token_order=col_major"), tokenizer_dir, tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
