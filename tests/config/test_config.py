"""Config schema: YAML loading, dotted overrides and validation errors that name the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from longvila_jax.config import (
    ConfigError,
    ModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_yaml,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAMLS = sorted((ROOT / "configs" / "model").glob("*.yaml"))


def test_model_yamls_are_shipped():
    names = {p.stem for p in MODEL_YAMLS}
    for required in (
        "llama3-longvila-8b",
        "qwen2-7b-longvila-256f",
        "qwen2-7b-longvila-1m",
        "qwen2-1.5b-longvila-256f",
        "longvila-r1-7b",
        "tiny-qwen2",
        "tiny-llama",
    ):
        assert required in names


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_every_model_yaml_parses_and_round_trips(path, tmp_path):
    cfg = load_config(ModelConfig, path)
    out = tmp_path / "again.yaml"
    save_yaml(cfg, out)
    assert load_config(ModelConfig, out) == cfg


def test_release_facts_in_shipped_configs():
    one_m = load_config(ModelConfig, ROOT / "configs/model/qwen2-7b-longvila-1m.yaml")
    assert one_m.llm.rope_theta == 1_062_356_830
    assert one_m.llm.rope_position_scale == 4.0
    assert one_m.tokens_per_frame == 196
    v1 = load_config(ModelConfig, ROOT / "configs/model/llama3-longvila-8b.yaml")
    assert v1.projector.token_order == "col_major"
    assert v1.llm.vocab_size == 128257
    r1 = load_config(ModelConfig, ROOT / "configs/model/longvila-r1-7b.yaml")
    assert (r1.projector.type, r1.tokens_per_frame) == ("mlp_downsample_2x2_fix", 256)


def _err(fn) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn()
    return info.value


def test_unknown_key_is_an_error_naming_the_path():
    e = _err(lambda: from_dict(ModelConfig, {"llm": {"hidden_sise": 8}}))
    assert e.field == "llm.hidden_sise"
    assert "unknown key" in str(e)


def test_wrong_type_names_the_field():
    e = _err(lambda: from_dict(ModelConfig, {"vision": {"patch_size": "fourteen"}}))
    assert e.field == "vision.patch_size"
    e = _err(lambda: from_dict(ModelConfig, {"llm": {"tie_word_embeddings": "yes"}}))
    assert e.field == "llm.tie_word_embeddings"
    e = _err(lambda: from_dict(ModelConfig, {"projector": {"type": "mlp_downsample_fix"}}))
    assert e.field == "projector.type"
    assert "mlp_downsample_2x2_fix" in str(e)


def test_semantic_checks_name_the_nested_field():
    e = _err(
        lambda: from_dict(
            ModelConfig, {"llm": {"num_attention_heads": 6, "num_key_value_heads": 4}}
        )
    )
    assert e.field == "llm.num_key_value_heads"
    e = _err(lambda: from_dict(ModelConfig, {"llm": {"rope_scaling": {"factor": 0.5}}}))
    assert e.field == "llm.rope_scaling.factor"
    e = _err(lambda: from_dict(ModelConfig, {"vision": {"select_layer": 40}}))
    assert e.field == "vision.select_layer"


def test_overrides_apply_and_parse_yaml_values():
    cfg = apply_overrides(
        ModelConfig,
        {},
        ["llm.rope_theta=1e7", "projector.token_order=col_major", "llm.rope_scaling={factor: 2}"],
    )
    assert cfg.llm.rope_theta == 1e7
    assert cfg.projector.token_order == "col_major"
    assert cfg.llm.rope_scaling is not None and cfg.llm.rope_scaling.factor == 2.0


def test_override_errors_name_the_field():
    assert _err(lambda: apply_overrides(ModelConfig, {}, ["llm.nope=1"])).field == "llm.nope"
    assert _err(lambda: apply_overrides(ModelConfig, {}, ["nope.x=1"])).field == "nope"
    assert _err(lambda: apply_overrides(ModelConfig, {}, ["llm.hidden_size=big"])).field == (
        "llm.hidden_size"
    )
    assert _err(lambda: apply_overrides(ModelConfig, {}, ["llm.hidden_size"])).field == (
        "llm.hidden_size"
    )


def test_load_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm:\n  heads: 3\n")
    e = _err(lambda: load_config(ModelConfig, bad))
    assert e.field == "llm.heads" and "bad.yaml" in str(e)
    bad.write_text("- a list\n")
    assert "top level must be a mapping" in str(_err(lambda: load_config(ModelConfig, bad)))


def test_to_dict_round_trip():
    cfg = from_dict(ModelConfig, {"llm": {"rope_scaling": {"factor": 4.0}}})
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_validation_survives_python_O():
    code = (
        "from longvila_jax.config import ModelConfig, from_dict, ConfigError\n"
        "try:\n"
        "    from_dict(ModelConfig, {'llm': {'num_key_value_heads': 5}})\n"
        "except ConfigError as e:\n"
        "    print('REJECTED', e.field)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert "REJECTED llm.num_key_value_heads" in out.stdout, out.stderr
