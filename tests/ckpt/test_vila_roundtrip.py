"""VILA -> project -> VILA round trips, HF loadability, load_pretrained parity, plain HF import.

Fixtures are tiny random HF models saved in the VILA layout (``vila_fixture``): a Qwen2 fp32
one (legacy ``vision_model.`` SigLIP keys, ``*_fix`` projector, untied head) and a Llama bf16
one (unprefixed SigLIP keys, ``mlp_downsample`` Aug-2024 projector, tied embeddings, linear
RoPE scaling). Both have sharded LLM weights with an index and an odd 5 x 5 patch grid.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from helpers import vila_fixture as vf
from helpers.hf_reference import frames, load_hf, prompt, vlm_logits

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.hf_parts_import import import_hf_parts
from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.ckpt.vila_export import export_vila
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.config.base import ConfigError

SPECS = {
    "qwen2_fp32": vf.Spec(),
    "llama_bf16": vf.Spec(
        arch="llama",
        dtype=torch.bfloat16,
        siglip_prefix=False,
        projector_type="mlp_downsample",
        tied=True,
        rope_scaling=4.0,
        seed=1,
    ),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def converted(request, tmp_path_factory):
    """(spec, vila dir, project checkpoint, exported vila dir)."""
    root = tmp_path_factory.mktemp(request.param)
    spec = SPECS[request.param]
    src = vf.build_vila(root / "vila", spec)
    import_vila(src, root / "ckpt")
    export_vila(root / "ckpt", root / "export")
    return spec, src, root / "ckpt", root / "export"


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_roundtrip_identical_layout_tensors_and_configs(converted):
    spec, src, _, out = converted
    a, b = _files(src), _files(out)
    assert sorted(a) == sorted(b)  # same file set, shard split, index, tokenizer files
    for comp in ("llm", "vision_tower", "mm_projector"):
        wa, wb = WeightSet(src / comp), WeightSet(out / comp)
        assert wa.plan() == wb.plan(), comp  # names, order, dtypes, shapes per shard
        for name in wa.names:
            ta, tb = wa.read(name), wb.read(name)
            assert ta.dtype == tb.dtype and ta.tobytes() == tb.tobytes(), name
    for name in a:
        if name.endswith(".json"):
            assert json.loads(a[name]) == json.loads(b[name]), name
    assert len(WeightSet(src / "llm").files) > 1  # the fixture really is sharded
    # Stronger than required: every file, weights included, is byte-identical.
    assert [n for n in a if a[n] != b[n]] == []


def test_unused_tensors_kept_and_siglip_spelling(converted):
    spec, src, ckpt, out = converted
    prov = orbax_io.read_provenance(ckpt)
    vis = prov["components"]["vision_tower"]
    assert vis["siglip_prefix"] == spec.siglip_prefix
    pre = "vision_model." if spec.siglip_prefix else ""
    # Layer 2 of 3 lies beyond hidden_states[-2]; post_layernorm and head never run.
    assert f"{pre}encoder.layers.2.mlp.fc1.weight" in vis["unused"]
    assert f"{pre}post_layernorm.weight" in vis["unused"]
    assert any(n.startswith(f"{pre}head.") for n in vis["unused"])
    stored = orbax_io.stored_tree(ckpt)
    assert stored["vision"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][0][0] == 2
    want = "bfloat16" if spec.dtype == torch.bfloat16 else "float32"
    assert orbax_io.read_model_config(ckpt).param_dtype == want


def test_token_order_default_and_override(converted, tmp_path):
    spec, src, ckpt, _ = converted
    cfg = orbax_io.read_model_config(ckpt)
    assert cfg.projector.token_order == ("col_major" if spec.arch == "llama" else "row_major")
    flipped = "row_major" if cfg.projector.token_order == "col_major" else "col_major"
    out = tmp_path / "o"
    cfg2 = import_vila(src, out, overrides=[f"projector.token_order={flipped}"])
    assert cfg2.projector.token_order == flipped
    export_vila(out, tmp_path / "e")  # the order has no JSON field: export is unchanged
    assert _files(tmp_path / "e") == _files(src)


@torch.no_grad()
def test_exported_dirs_load_in_hf_with_identical_outputs(converted):
    spec, src, _, out = converted
    ref, got = load_hf(src, spec.dtype), load_hf(out, spec.dtype)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(ref[0](ids).logits, got[0](ids).logits)
    px = torch.from_numpy(frames(2, spec.v_image).transpose(0, 3, 1, 2).copy()).to(spec.dtype)
    assert torch.equal(ref[1](px).last_hidden_state, got[1](px).last_hidden_state)


def test_load_pretrained_both_layouts_match_hf_reference(converted):
    spec, src, ckpt, _ = converted
    # bf16 checkpoints are upcast exactly on both sides, so fp32 tolerances apply to both.
    from_vila = load_pretrained(src, dtype="float32")
    model = load_pretrained(ckpt, dtype="float32")
    a, b = nnx.to_pure_dict(nnx.state(from_vila)), nnx.to_pure_dict(nnx.state(model))
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y), path
    tok = load_tokenizer(ckpt)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (
        model.cfg.image_token_id == image_id == load_tokenizer(src).convert_tokens_to_ids("<image>")
    )
    ids, px = prompt(image_id, 2), frames(2, spec.v_image)
    want = vlm_logits(load_hf(src), ids, px, image_id)
    got = np.asarray(model(ids[None], px))[0]
    assert got.shape == want.shape == (len(ids) - 2 + 2 * model.cfg.tokens_per_frame, spec.vocab)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_changed_rope_is_written_to_exactly_those_fields(converted, tmp_path):
    spec, src, ckpt, _ = converted
    cfg = orbax_io.read_model_config(ckpt)
    llm = dataclasses.replace(cfg.llm, rope_theta=207_112_184.0, max_position_embeddings=8192)
    new = dataclasses.replace(cfg, llm=llm)
    orbax_io.save_checkpoint(tmp_path / "c2", new, orbax_io.load_params(ckpt), like=ckpt)
    export_vila(tmp_path / "c2", tmp_path / "e2")
    a, b = _files(src), _files(tmp_path / "e2")
    assert sorted(a) == sorted(b)
    changed = sorted(n for n in a if a[n] != b[n])
    assert changed == ["config.json", "llm/config.json"]
    for name, path in (("llm/config.json", ()), ("config.json", ("llm_cfg",))):
        old, cur = json.loads(a[name]), json.loads(b[name])
        for k in path:
            old, cur = old[k], cur[k]
        assert cur["rope_parameters"]["rope_theta"] == 207_112_184.0
        assert cur["max_position_embeddings"] == 8192
        cur["rope_parameters"]["rope_theta"] = old["rope_parameters"]["rope_theta"]
        cur["max_position_embeddings"] = old["max_position_embeddings"]
        assert cur == old
    hf = tf.AutoConfig.from_pretrained(tmp_path / "e2" / "llm")
    assert hf.rope_parameters["rope_theta"] == 207_112_184.0


def test_unexportable_config_change_raises(converted, tmp_path):
    _, _, ckpt, _ = converted
    cfg = orbax_io.read_model_config(ckpt)
    bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_act="gelu"))
    orbax_io.save_checkpoint(tmp_path / "c3", bad, orbax_io.load_params(ckpt), like=ckpt)
    with pytest.raises(ConfigError, match="vision.hidden_act"):
        export_vila(tmp_path / "c3", tmp_path / "e3")
    assert not (tmp_path / "e3").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c3"]


@pytest.mark.slow
def test_plain_hf_parts_import(tmp_path):
    """Stage 1's start: plain Qwen2 + a full SiglipModel (vision + text) + a new projector."""
    spec = vf.Spec(arch="qwen2", siglip_prefix=False, vocab=96, seed=3)
    llm, vision, _ = vf.build_models(spec)
    llm.save_pretrained(tmp_path / "llm")
    # A plain LLM tokenizer: no media tokens yet (VILA adds them when it builds the model).
    vf.make_tokenizer(spec.vocab, media=False).save_pretrained(tmp_path / "llm")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    full = tf.SiglipModel(
        tf.SiglipConfig(text_config=text, vision_config=vf.vision_config(spec).to_dict())
    ).eval()
    full.save_pretrained(tmp_path / "siglip")
    ckpt = tmp_path / "ckpt"
    cfg = import_hf_parts(
        tmp_path / "llm", tmp_path / "siglip", ckpt, projector_type="mlp_downsample_2x2_fix"
    )
    assert cfg.projector.token_order == "row_major"
    assert cfg.image_token_id == load_tokenizer(ckpt).convert_tokens_to_ids("<image>")
    assert cfg.image_token_id >= spec.vocab  # added past the table, never gathered
    export_vila(ckpt, tmp_path / "vila")
    # Stage 1's tokens (VILA train.py): the tokenizer has no BOS, so [BOS] is added and the
    # tables gain its row (checked in test_hf_parts_resize); the pad becomes the unk "w1".
    tok = load_tokenizer(ckpt)
    assert (tok.bos_token, tok.bos_token_id, tok.pad_token) == ("[BOS]", spec.vocab, "w1")
    assert cfg.llm.vocab_size == spec.vocab + 1
    # The other LLM tensors and the kept rows are untouched; the vision tower is the vision
    # half of the SiglipModel.
    wa, wb = WeightSet(tmp_path / "llm"), WeightSet(tmp_path / "vila" / "llm")
    assert sorted(wa.names) == sorted(wb.names)
    for n in wa.names:
        a, b = wa.read(n), wb.read(n)
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert b.shape == (spec.vocab + 1, a.shape[1]), n
            b = b[: spec.vocab]
        assert a.tobytes() == b.tobytes(), n
    ws, wv = WeightSet(tmp_path / "siglip"), WeightSet(tmp_path / "vila" / "vision_tower")
    assert sorted(wv.names) == sorted(n for n in ws.names if n.startswith("vision_model."))
    for n in wv.names:
        assert ws.read(n).tobytes() == wv.read(n).tobytes(), n
    px = frames(2, spec.v_image)
    ref = load_hf(tmp_path / "vila")
    with torch.no_grad():
        pt = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
        # Same weights (checked bitwise above); only the attention kernels may differ (sdpa).
        torch.testing.assert_close(
            ref[1](pt).last_hidden_state, full.vision_model(pt).last_hidden_state, rtol=0, atol=1e-5
        )
    # The generated VILA layout re-imports, and the model matches the HF reference.
    import_vila(tmp_path / "vila", tmp_path / "ckpt2")
    model = load_pretrained(tmp_path / "ckpt2")
    ids = prompt(cfg.image_token_id, 2)
    want = vlm_logits(ref, ids, px, cfg.image_token_id)
    np.testing.assert_allclose(np.asarray(model(ids[None], px))[0], want, atol=1e-4, rtol=0)
