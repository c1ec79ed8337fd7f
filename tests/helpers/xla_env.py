"""XLA settings shared by the test process (conftest.py) and the jax subprocesses tests launch.

Test programs are tiny and run a handful of times, so LLVM's backend optimisation is most of
their cost and buys nothing: every test compiles at -O0 (XLA:CPU keeps IEEE semantics either
way, fast-math is off). The exception is the trainer in the kill-and-resume chains, which
relaunches the same cached executables dozens of times: there optimised code is cheaper.
"""

from __future__ import annotations

import os
from pathlib import Path

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CACHE_ENV = "LONGVILA_TEST_JAX_CACHE"


def xla_flags(devices: int, fast: bool = True) -> str:
    """XLA_FLAGS for a process with ``devices`` simulated CPU devices."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return f"{flags} {FAST_COMPILE}" if fast else flags


def jax_env(devices: int, fast: bool = True, cache: Path | None = None) -> dict:
    """Environment for a jax subprocess: ``devices`` CPU devices, the fast flags (``fast``) and
    the persistent compilation cache ``cache`` (default: the session's, when it has one)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices, fast)
    env["JAX_PLATFORMS"] = "cpu"
    cache = cache or os.environ.get(CACHE_ENV)
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def session_cache_dir(basetemp: Path) -> Path:
    """One compilation cache per pytest run, shared by its xdist workers (their basetemps are
    siblings under the run's directory, which pytest's retention policy removes later)."""
    root = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    d = root / "jax_cache"
    d.mkdir(parents=True, exist_ok=True)
    return d
