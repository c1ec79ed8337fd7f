"""The checked JSON/YAML loader refuses what Python's parsers accept from a hostile file.

Each case is the attack itself (an alias bomb, a deeply nested document, duplicate keys, an
unsafe tag, a FIFO) and checks the refusal: the project's error type, a message naming the
file or field, bounded in size, and no ``RecursionError`` or hang.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers.limits import time_limit

from longvila_jax.config.base import ConfigError, load_config, load_yaml, parse_override
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.errors import CheckpointError, InputError, brief
from longvila_jax.core.safe_load import (
    MAX_DEPTH,
    MAX_YAML_NODES,
    load_json,
    load_yaml_file,
    parse_json,
    parse_yaml,
)

REPO = Path(__file__).resolve().parents[2]


def alias_bomb(depth: int = 9, width: int = 9) -> str:
    """The classic 'billion laughs' YAML: ``width ** depth`` leaves from ~1 KB of text."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_refused_fast_with_small_message(tmp_path):
    text = alias_bomb()
    assert len(text) < 1200
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb") as e:
        parse_yaml(text, "model")
    assert time.perf_counter() - t0 < 5  # a generous bound for a refusal that takes ~ms
    assert e.value.field == "model"
    assert len(str(e.value)) < 300


def test_model_yaml_alias_bomb_in_a_checkpoint_is_refused(tmp_path):
    # The original attack: a 1 KB model.yaml whose error message used to be 351 MB.
    path = tmp_path / "model.yaml"
    path.write_text("vision: " + alias_bomb().replace("\n", "\n  ").rstrip() + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, path)
    assert str(path) in str(e.value)
    assert len(str(e.value)) < 400


def test_small_shared_aliases_still_load():
    data = parse_yaml(
        "base: &b {lr: 1.0e-4, steps: 3}\nstage1: *b\nstage2: {<<: *b, steps: 5}\n", "x"
    )
    assert data["stage1"] == {"lr": 1.0e-4, "steps": 3}
    assert data["stage2"] == {"lr": 1.0e-4, "steps": 5}


def test_recursive_yaml_alias_refused():
    with pytest.raises(ConfigError, match="recursive"):
        parse_yaml("a: &a [1, *a]\n", "x")


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_deep_nesting_refused_without_recursion_error(kind):
    depth = 100_000
    text = "[" * depth + "]" * depth
    parse = parse_yaml if kind == "yaml" else parse_json
    with pytest.raises(ConfigError, match="nested deeper than") as e:
        parse(text, "cfg")
    assert not isinstance(e.value.__context__, RecursionError) or e.value.__suppress_context__


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_nesting_at_the_limit_loads(kind):
    text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    value = (parse_yaml if kind == "yaml" else parse_json)(text, "cfg")
    for _ in range(MAX_DEPTH - 1):
        value = value[0]
    assert value == []
    with pytest.raises(ConfigError):
        (parse_yaml if kind == "yaml" else parse_json)("[" + text + "]", "cfg")


def test_duplicate_keys_refused():
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        parse_yaml("lr: 1\nsteps: 2\nlr: 3\n", "optim")
    with pytest.raises(CheckpointError, match="duplicate key 'w'"):
        parse_json('{"w": {"dtype": "F32"}, "w": {"dtype": "I32"}}', "header", CheckpointError)


@pytest.mark.parametrize(
    "text", ["NaN", '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e400}', "[" + "9" * 5000 + "]"]
)
def test_nonstandard_json_numbers_refused(text):
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_json(text, "config.json")


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch /tmp/pwned']\n",
        "a: !!python/name:os.system\n",
        "a: [1, 2\n",
        "a: b: c\n",
        "x: 1\n---\ny: 2\n",
        "a: " + "9" * 6000 + "\n",  # over Python's int digit limit
    ],
)
def test_bad_yaml_is_a_config_error_with_a_line(text):
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "stage")
    assert e.value.field == "stage"
    assert "YAML" in e.value.message


def test_yaml_expansion_limit_counts_aliases():
    # 2 ** 17 leaves from 17 small lines: over the default limit only once aliases expand.
    lines = ["l0: &l0 [x, x]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 17)]
    assert MAX_YAML_NODES < 2**17
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml("\n".join(lines), "x")


def test_load_json_file_checks(tmp_path):
    good = tmp_path / "config.json"
    good.write_text(json.dumps({"a": [1, 2]}))
    assert load_json(good, "config.json") == {"a": [1, 2]}
    with pytest.raises(ConfigError, match="must hold a JSON list"):
        load_json(good, "manifest", expect=list)
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(ConfigError, match="over the 50-byte limit"):
        load_json(big, "big", expect=list, max_bytes=50)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        load_json(bad, "bad")
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_json(tmp_path / "missing.json", "missing")


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "stage.yaml"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(InputError, match="FIFO"):
        load_yaml_file(fifo, "stage")


def test_load_yaml_names_the_pointing_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_yaml(tmp_path / "nope.yaml", "data.file")
    assert e.value.field == "data.file" and "does not exist" in e.value.message
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml", "model")


def test_overrides_go_through_the_checked_loader():
    assert parse_override("optim.lr=1.0e-5") == ("optim.lr", 1e-5)
    with pytest.raises(ConfigError):
        parse_override("a=!!python/object/apply:os.system [echo]")
    with pytest.raises(ConfigError, match="nested"):
        parse_override("a=" + "[" * 500 + "]" * 500)


def test_config_values_in_messages_are_bounded(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(f"param_dtype: {'x' * 1_000_000}\n")
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, path)
    assert e.value.field == "param_dtype"
    assert len(str(e.value)) < 600


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "'nan'", "1e999"])
def test_non_finite_floats_refused_in_configs(tmp_path, value):
    base = (REPO / "configs/model/tiny-qwen2.yaml").read_text()
    assert "rope_theta:" in base
    lines = [
        f"  rope_theta: {value}" if ln.strip().startswith("rope_theta:") else ln
        for ln in base.splitlines()
    ]
    path = tmp_path / "model.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="finite") as e:
        load_config(ModelConfig, path)
    assert e.value.field == "llm.rope_theta"


def test_brief_bounds_nested_and_long_values():
    nested: list = []
    for _ in range(10_000):
        nested = [nested, nested]  # shared: expanding it would be 2 ** 10000 items
    assert len(brief(nested)) < 450
    assert len(brief("x" * 10**6)) < 450
