"""Helpers for the trainer tests: trainer subprocesses (single and distributed), checkpoint
damage, and the tiny stage configs of ``tests/_stages.py``.

Trainer subprocesses share one persistent JAX compilation cache per session, so only the first
launch of a given program pays the XLA compile (cached executables are bit-identical).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from _stages import MESH, REPO, TINY_MODEL, stage_dict, video_stage_dict, write_stage
from _xla_env import jax_env, xla_flags

__all__ = ["MESH", "REPO", "TINY_MODEL", "stage_dict", "video_stage_dict", "write_stage"]


def trainer_env(jax_cache: Path, kill: str | None = None) -> dict:
    env = jax_env(8, fast=False, cache=jax_cache)  # cached executables rerun often: keep -O2
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("LONGVILA_TEST_KILL", None)
    if kill:
        env["LONGVILA_TEST_KILL"] = kill
    return env


# ``python -m longvila_jax.train`` as installed without the test extras: torch (a test-only
# dependency, for HF reference numerics; the library never imports it) is hidden, so that
# transformers does not import it when the tokenizer loads. That import is about a quarter of a
# trainer launch's CPU time, and the kill-and-resume tests launch the trainer dozens of times.
_TRAINER_MAIN = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "runpy.run_module('longvila_jax.train', run_name='__main__', alter_sys=True)"
)


def trainer_cmd(config: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-c", _TRAINER_MAIN, "--config", str(config), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_trainer(config: Path, jax_cache: Path, *, kill: str | None = None, timeout: int = 240):
    """Runs the trainer CLI to completion; returns the CompletedProcess."""
    return subprocess.run(
        trainer_cmd(config),
        env=trainer_env(jax_cache, kill),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(jax_cache: Path, port: int, process_id: int, devices: int) -> dict:
    """Trainer environment of process ``process_id`` of a 2-process job on localhost."""
    env = trainer_env(jax_cache)
    env["XLA_FLAGS"] = xla_flags(devices)  # each launch compiles once: -O0 is cheaper
    env.update(
        LONGVILA_COORDINATOR=f"127.0.0.1:{port}",
        LONGVILA_NUM_PROCESSES="2",
        LONGVILA_PROCESS_ID=str(process_id),
    )
    return env


def run_concurrently(runs: list[tuple[Path, dict]], timeout: int = 300) -> None:
    """Runs the trainer for every (config, env) at once, e.g. a one-process reference beside
    the processes of a distributed job (compiling is mostly single-threaded, so they share two
    cores better than two rounds would). Fails with the log of a launch that exits non-zero;
    on a timeout every launch is killed."""
    procs = [
        subprocess.Popen(
            trainer_cmd(cfg),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cfg, env in runs
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


def array_file(step_dir: Path) -> Path:
    """The largest array data file (OCDBT ``d/`` entry) of a checkpoint step's train state."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    if not files:
        raise FileNotFoundError(f"no array data files under {step_dir}/state")
    return max(files, key=lambda p: p.stat().st_size)


def flip_array_byte(step_dir: Path) -> str:
    """Flips one bit in the middle of the step's largest array file; returns its relative path."""
    f = array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f.relative_to(step_dir).as_posix()
