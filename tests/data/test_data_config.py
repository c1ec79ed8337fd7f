"""DataConfig schema: YAML instances load, bad values are refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from longvila_jax.config.base import ConfigError, from_dict, load_config
from longvila_jax.config.data import DataConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_instances_load(path):
    cfg = load_config(DataConfig, path)
    assert cfg.datasets and cfg.row_length % cfg.pad_multiple == 0


def test_row_length_rounds_up_to_pad_multiple():
    cfg = from_dict(DataConfig, {"max_length": 1000, "pad_multiple": 64})
    assert cfg.row_length == 1024 and cfg.text_length == 1024
    assert from_dict(DataConfig, {"max_length": 1000, "max_text_tokens": 300}).text_length == 300


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"sp_degree": 0}, "sp_degree"),
        (
            {"datasets": [{"name": "a", "manifest": "a", "kind": "video", "group_size": 4}]},
            "datasets[0].group_size",
        ),
        (
            {"datasets": [{"name": "a", "manifest": "a", "kind": "coyo", "group_size": 0}]},
            "datasets[0].group_size",
        ),
        ({"max_fps": -1.0}, "max_fps"),
        ({"max_skip_rate": 1.5}, "max_skip_rate"),
        ({"decode_timeout_s": -1.0}, "decode_timeout_s"),
        ({"max_length": 100, "max_text_tokens": 200}, "max_text_tokens"),
        ({"template": "vicuna"}, "template"),
        ({"datasets": [{"name": "a", "manifest": "a.json", "kind": "audio"}]}, "datasets[0].kind"),
        (
            {"datasets": [{"name": "a", "manifest": "a.json", "kind": "video", "weight": 0}]},
            "datasets[0].weight",
        ),
        ({"datasets": [{"name": "a", "manifest": "x", "kind": "text"}] * 2}, "datasets"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        ({"worker_count": -1}, "worker_count"),
        ({"unknown_knob": 1}, "unknown_knob"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        from_dict(DataConfig, data)
    assert e.value.field == field


def test_model_compat(corpus, make_cfg):
    from longvila_jax.config.model import ModelConfig, VisionConfig
    from longvila_jax.data.pipeline import check_model_compat

    # 32 px / patch 8 = 4x4 patches, 2x2 merge -> 4 tokens per frame (the corpus data.yaml).
    model = ModelConfig(vision=VisionConfig(image_size=32, patch_size=8), image_token_id=3)
    check_model_compat(make_cfg(corpus), model)
    with pytest.raises(ConfigError) as e:
        check_model_compat(make_cfg(corpus, tokens_per_frame=196), model)
    assert e.value.field == "tokens_per_frame"
    with pytest.raises(ConfigError) as e:
        check_model_compat(
            make_cfg(corpus),
            ModelConfig(vision=VisionConfig(image_size=32, patch_size=8), image_token_id=151649),
        )
    assert e.value.field == "tokenizer_dir" and "151649" in str(e.value)
