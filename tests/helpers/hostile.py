"""Helpers of the hostile-input checkpoint tests (test_hostile_*.py).

An attacker who ships a whole project checkpoint also ships a matching integrity manifest, so
the tests that tamper with a checkpoint's contents ``reseal`` it: the manifest then passes and
the content checks behind it are what must refuse the file. ``no_hang`` runs a call that
opens a FIFO with a deadline, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from helpers.xla_env import FAST_COMPILE
from longvila_jax.core.manifest import MANIFEST_FILE, write_manifest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV["XLA_FLAGS"] = FAST_COMPILE


def reseal(ckpt: Path) -> None:
    """Rewrites the manifest of ``ckpt`` for its current files (what an attacker ships)."""
    (ckpt / MANIFEST_FILE).unlink(missing_ok=True)
    write_manifest(ckpt)


def edit_json(path: Path, fn) -> None:
    """Applies ``fn`` to the parsed JSON file and writes it back."""
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=1))


def tree(d: Path) -> list[str]:
    """Every path under ``d`` (links not followed), relative, sorted."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def no_hang(fn, fifos: list[Path], timeout: float = 20.0) -> BaseException | None:
    """Runs ``fn()`` in a thread; returns what it raised (None if it returned).

    Fails (AssertionError) when ``fn`` is still running after ``timeout`` seconds, after
    releasing a reader blocked on one of ``fifos`` by opening their write ends.
    """
    box: list = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # no reader blocked on this one
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError(f"still blocked after {timeout} s (reading a FIFO?)")
    return box[0]


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m longvila_jax.convert ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "longvila_jax.convert", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
