"""HF / VILA JSON config parsing: RoPE spellings, SigLIP nesting, token-order defaults.

Pure-dict tests against the facts of longvila.md sections 3.2-3.4; no model is built.
"""

from __future__ import annotations

import json

import pytest

from longvila_jax.ckpt import hf_config
from longvila_jax.config.base import ConfigError, from_dict
from longvila_jax.config.model import LLMConfig, RopeScaling

QWEN2_7B_1M = {
    "model_type": "qwen2",
    "vocab_size": 151648,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "rope_theta": 1062356830.0,
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}


def test_legacy_rope_keys_qwen2_1m():
    cfg = from_dict(LLMConfig, hf_config.llm_fields(QWEN2_7B_1M))
    assert cfg.arch == "qwen2" and cfg.qkv_bias and not cfg.o_bias
    assert cfg.rope_theta == 1_062_356_830.0
    assert cfg.rope_scaling == RopeScaling("linear", 4.0)
    assert cfg.rope_position_scale == 4.0
    assert cfg.num_key_value_heads == 4 and cfg.max_position_embeddings == 1_048_576


def test_transformers5_rope_parameters():
    d = {k: v for k, v in QWEN2_7B_1M.items() if not k.startswith("rope")}
    d["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1062356830.0}
    assert hf_config.llm_fields(d)["rope_scaling"] == {"type": "linear", "factor": 4.0}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 15_300_000.0}
    fields = hf_config.llm_fields(d)
    assert fields["rope_theta"] == 15_300_000.0 and fields["rope_scaling"] is None


def test_llama_defaults_and_attention_bias():
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "attention_bias": True}
    f = hf_config.llm_fields(d)
    assert f["num_key_value_heads"] == 4  # HF: defaults to the query heads
    assert f["qkv_bias"] and f["o_bias"] and not f["mlp_bias"]
    assert f["rope_theta"] == 10000.0 and f["max_position_embeddings"] == 2048


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "llm.arch"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "llm.rope_scaling"),
        ({"use_sliding_window": True}, "llm.use_sliding_window"),
        ({"hidden_act": "gelu"}, "llm.hidden_act"),
    ],
)
def test_unsupported_llm_configs_name_the_field(change, field):
    with pytest.raises(ConfigError) as e:
        hf_config.llm_fields({**QWEN2_7B_1M, **change})
    assert e.value.field == field


def test_siglip_vision_config_and_full_siglip_model():
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
    }
    f = hf_config.vision_fields(vision)
    assert f["hidden_size"] == 1152 and f["layer_norm_eps"] == 1e-6
    full = {"model_type": "siglip", "text_config": {"hidden_size": 1152}, "vision_config": vision}
    assert hf_config.vision_fields(full) == f
    # Keys a config leaves out take transformers' SiglipVisionConfig defaults.
    assert hf_config.vision_fields({"model_type": "siglip_vision_model"})["patch_size"] == 16
    with pytest.raises(ConfigError, match="SigLIP only"):
        hf_config.vision_fields({"model_type": "clip_vision_model"})


@pytest.mark.parametrize(
    "ptype, top, arch, want",
    [
        ("mlp_downsample", {}, "llama", "col_major"),  # Llama-3-LongVILA-8B (Aug 2024)
        ("mlp_downsample", {}, "qwen2", "row_major"),  # qwen2-7b-longvila-1M
        ("mlp_downsample_2x2_fix", {}, "llama", "row_major"),  # any *_fix projector
        ("mlp_downsample_3x3_fix", {}, "qwen2", "row_major"),
        ("mlp_downsample", {"image_encoder": {}}, "llama", "row_major"),  # NVILA-era config
        ("mlp_downsample", {"chat_template": "x"}, "llama", "row_major"),
    ],
)
def test_token_order_default(ptype, top, arch, want):
    assert hf_config.token_order_default(ptype, top, arch) == want


def test_r1_style_reads_config_vila_style(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vila", "auto_map": {}}))
    (tmp_path / "config_vila_style.json").write_text(json.dumps({"mm_vision_select_layer": -2}))
    top, name, notes = hf_config._vila_top(tmp_path)
    assert name == "config_vila_style.json" and top == {"mm_vision_select_layer": -2}
    assert notes


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        hf_config.read_json(tmp_path / "config.json", "config.json")
    assert e.value.field == "config.json"


def _legacy_configs() -> dict:
    llm = {**QWEN2_7B_1M, "rope_theta": 15_300_000.0, "rope_scaling": None}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "layer_norm_eps": 1e-6}
    top = {"llm_cfg": dict(llm), "vision_tower_cfg": dict(vision), "mm_vision_select_layer": -2}
    return {"config.json": top, "llm/config.json": llm, "vision_tower/config.json": vision}


def test_export_edits_legacy_rope_keys_and_select_layer():
    import dataclasses

    from longvila_jax.ckpt.vila_export import apply_config_edits, config_edits
    from longvila_jax.config.base import to_dict
    from longvila_jax.config.model import ModelConfig

    old = ModelConfig(
        llm=from_dict(LLMConfig, hf_config.llm_fields(_legacy_configs()["llm/config.json"]))
    )
    new = dataclasses.replace(
        old,
        llm=dataclasses.replace(
            old.llm, rope_theta=1_062_356_830.0, rope_scaling=RopeScaling("linear", 4.0)
        ),
        vision=dataclasses.replace(old.vision, select_layer=-3),
        projector=dataclasses.replace(old.projector, token_order="col_major"),  # no JSON field
    )
    edits = config_edits(to_dict(old), new)
    assert set(edits) == {
        ("llm", "rope_theta"),
        ("llm", "rope_scaling"),
        ("vision", "select_layer"),
    }
    configs = _legacy_configs()
    changed = apply_config_edits(configs, edits, new)
    assert changed == {"config.json", "llm/config.json"}
    for d in (configs["llm/config.json"], configs["config.json"]["llm_cfg"]):
        assert d["rope_theta"] == 1_062_356_830.0
        assert d["rope_scaling"] == {"type": "linear", "factor": 4.0}
        assert "rope_parameters" not in d
    assert configs["config.json"]["mm_vision_select_layer"] == -3
    assert configs["vision_tower/config.json"] == _legacy_configs()["vision_tower/config.json"]
    bad = dataclasses.replace(new, llm=dataclasses.replace(new.llm, num_hidden_layers=3))
    with pytest.raises(ConfigError) as e:
        config_edits(to_dict(old), bad)
    assert e.value.field == "llm.num_hidden_layers"
