"""Helpers for the trainer tests: tiny stage configs, trainer subprocesses, checkpoint damage.

Trainer subprocesses share one persistent JAX compilation cache per session, so only the first
launch of a given program pays the XLA compile (cached executables are bit-identical).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "configs/model/tiny-qwen2.yaml")
MESH = str(REPO / "configs/mesh/cpu8_r2u4.yaml")


def stage_dict(corpus: Path, run_dir: Path, **overrides) -> dict:
    """A tiny image + interleaved-document stage (frames go through the tower) as plain data."""
    d = {
        "name": "tiny",
        "model": TINY_MODEL,
        "init_from": "random",
        "trainable": ["projector/.*", "llm/.*"],
        "data": {
            "inline": {
                "root": str(corpus),
                "tokenizer_dir": "tokenizer",
                "datasets": [
                    {"name": "images", "manifest": "images.jsonl", "kind": "image"},
                    {"name": "docs", "manifest": "interleaved.jsonl", "kind": "interleaved"},
                ],
                "image_size": 64,
                "tokens_per_frame": 4,
                "max_frames_per_row": 4,
                "max_segments_per_row": 4,
                "batch_size": 2,
                "decode_timeout_s": 0.0,
                "pad_multiple": 16,
            }
        },
        "seq_len": 128,
        "steps": 6,
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "mesh": MESH,
        "run_dir": str(run_dir),
        "tensorboard": False,
    }
    for k, v in overrides.items():
        d[k] = v
    return d


def write_stage(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trainer_env(jax_cache: Path, kill: str | None = None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax_cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
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
