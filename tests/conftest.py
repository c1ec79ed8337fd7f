"""Test setup: 8 simulated CPU devices and fast compiles, set before jax is imported anywhere,
and one persistent compilation cache per test run (tests/helpers/xla_env.py)."""

import os

from helpers.xla_env import CACHE_ENV, session_cache_dir, xla_flags

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax._src import monitoring  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """Programs compiled by several tests (and by the trainer subprocesses) compile once."""
    d = session_cache_dir(tmp_path_factory.getbasetemp())
    os.environ[CACHE_ENV] = str(d)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d


# The longest files go first, longest first: with ``--dist loadfile --no-loadscope-reorder``
# (scripts/test.sh) xdist hands files to the workers in collection order, and a long file
# collected last would run alone at the end.
LONGEST_FIRST = (
    "tests/test_demo.py",
    "tests/train/test_resume.py",
    "tests/train/test_resume_offsets.py",
    "tests/parallel/test_mmsp_attention.py",
    "tests/parallel/test_mmsp_model.py",
    "tests/train/test_multihost_mmsp.py",
    "tests/train/test_resume_final.py",
    "tests/ckpt/test_convert_cli.py",
    "tests/train/test_step.py",
    "tests/infer/test_infer_decode.py",
    "tests/data/test_data_resume.py",
    "tests/train/test_multihost.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="module")
def compile_events():
    """Counts XLA backend compilations while a module's tests run (abstract tracing for
    ``eval_shape`` is allowed): a test asserts it stays empty."""
    events: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    yield events
    monitoring.unregister_event_duration_listener(listener)
