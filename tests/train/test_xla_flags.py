"""GPU XLA flags of the trainer (``train.xla_flags``): added on GPU only, never over a user's own
setting, decided without initialising jax, and known to the installed jaxlib (XLA aborts the
process on an unknown flag name)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.xla_env import jax_env

from longvila_jax.train import xla_flags
from longvila_jax.train.xla_flags import GPU_FLAGS, apply_gpu_flags, target_platform, with_gpu_flags

LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"


def test_gpu_gets_the_overlap_flags_and_cpu_nothing():
    assert ("xla_gpu_enable_latency_hiding_scheduler", "true") in GPU_FLAGS
    assert with_gpu_flags("", "gpu") == LHS
    assert with_gpu_flags("--xla_dump_to=/tmp/d", "gpu") == f"--xla_dump_to=/tmp/d {LHS}"
    for platform in ("cpu", "tpu", "rocm"):
        assert with_gpu_flags("", platform) == ""
        assert with_gpu_flags("--xla_dump_to=/tmp/d", platform) == "--xla_dump_to=/tmp/d"


@pytest.mark.parametrize(
    "user",
    [
        "--xla_gpu_enable_latency_hiding_scheduler=false",
        "--xla_gpu_enable_latency_hiding_scheduler",  # bare boolean flag
        "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=0",
    ],
)
def test_a_flag_the_user_set_is_left_alone(user):
    assert with_gpu_flags(user, "gpu") == user


def test_platform_without_jax(monkeypatch):
    assert target_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert target_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
    assert target_platform({"JAX_PLATFORMS": " GPU "}) == "gpu"
    assert target_platform({"JAX_PLATFORMS": "tpu"}) == "tpu"
    # Unset: jax takes the GPU when a CUDA plugin is installed.
    found: list[str] = []

    def fake_find_spec(name):
        found.append(name)
        return object() if name == "jax_cuda13_plugin" else None

    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", fake_find_spec)
    assert target_platform({}) == "gpu" and found[0] == "jax_cuda13_plugin"
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)
    assert target_platform({"JAX_PLATFORMS": ""}) == "cpu"

    def broken(name):
        raise ModuleNotFoundError(name)  # find_spec of "jax_plugins.x" without jax_plugins

    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", broken)
    assert target_platform({}) == "cpu"


def test_apply_updates_the_environment_on_gpu_only():
    env = {"JAX_PLATFORMS": "cpu"}
    assert apply_gpu_flags(env) == [] and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert apply_gpu_flags(env) == ["xla_gpu_enable_latency_hiding_scheduler"]
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {LHS}"
    assert apply_gpu_flags(env) == []  # idempotent


def test_the_train_cli_applies_them_first(monkeypatch, tmp_path, capsys):
    from longvila_jax.train.__main__ import main

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # read only by apply_gpu_flags here
    monkeypatch.setenv("XLA_FLAGS", "")
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2  # a config error, after
    assert LHS in os.environ["XLA_FLAGS"]


def test_every_flag_is_known_to_the_installed_jaxlib():
    """XLA parses XLA_FLAGS for every backend, the CPU one included, and aborts on a name it
    does not know: a jit on CPU with the GPU flags set proves the names (and the check itself
    fails on a made-up name)."""
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum()))"
    flags = " ".join(f"--{n}={v}" for n, v in GPU_FLAGS)
    for extra, ok in (("", True), (" --xla_gpu_no_such_flag_for_this_test=true", False)):
        env = jax_env(1)
        env["XLA_FLAGS"] = flags + extra
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert (run.returncode == 0) == ok, run.stderr[-2000:]
        if ok:
            assert run.stdout.strip() == "4.0"
        else:
            assert "Unknown flag" in run.stderr
