"""Fixtures for the trainer tests: one synthetic corpus and one JAX compile cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from longvila_jax.data.synthetic import generate

    out = tmp_path_factory.mktemp("train_corpus")
    generate(out, seed=0, size=64, n_images=12, n_videos=6)
    return out


@pytest.fixture(scope="session")
def jax_cache(jax_compilation_cache) -> Path:
    """The trainer subprocesses share the session's compilation cache (tests/conftest.py)."""
    return jax_compilation_cache
