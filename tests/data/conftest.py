"""Fixtures for the data tests: one synthetic corpus per session and small config builders."""

from __future__ import annotations

from pathlib import Path

import pytest

from longvila_jax.config.base import from_dict, load_yaml
from longvila_jax.config.data import DataConfig
from longvila_jax.data.synthetic import generate


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, seed=0, size=32, n_images=12, n_videos=6)
    return out


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from longvila_jax.data.text import load_tokenizer

    return load_tokenizer(corpus / "tokenizer")


def make_config(corpus: Path, **overrides) -> DataConfig:
    """The corpus's data.yaml with overrides (tiny rows, no sandbox unless asked)."""
    data = load_yaml(corpus / "data.yaml")
    data.update({"decode_timeout_s": 0.0, "max_length": 256, "max_frames_per_row": 16})
    data.update(overrides)
    return from_dict(DataConfig, data)


@pytest.fixture(scope="session")
def make_cfg():
    """``make_config`` as a fixture (tests/ is not a package, so it cannot be imported)."""
    return make_config
