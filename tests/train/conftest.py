"""Fixtures for the trainer tests: one synthetic corpus and one JAX compile cache per session,
and for the kill-and-resume chains the shared reference run and a trainer fork server."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.harness import Reference, TrainerServer, shared_reference


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


@pytest.fixture(scope="module")
def reference(corpus, jax_cache) -> Reference:
    """The uninterrupted run every kill chain must end equal to (made once per session)."""
    return Reference.load(shared_reference(corpus, jax_cache))


@pytest.fixture(scope="module")
def trainer(jax_cache, tmp_path_factory):
    """Trainer launches forked from a process that has done the imports (``helpers.harness``)."""
    server = TrainerServer(jax_cache, tmp_path_factory.mktemp("launches"))
    yield server
    server.close()
