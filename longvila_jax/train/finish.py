"""The final phase of a stage: the project checkpoint ``final/`` and the VILA export ``vila/``.

After the last checkpoint is committed, the stage writes ``<run_dir>/final`` (LoRA merged, the
``ckpt.orbax_io`` layout with its integrity manifest) for the next stage's ``stage:<name>``,
then, with ``export_vila``, ``<run_dir>/vila``. Each directory is built under a temporary
sibling name and renamed when complete, so a process killed at any moment leaves either the
whole directory or a ``.final.tmp-*`` / ``.vila.tmp-*`` leftover, which the next launch removes
before writing. A relaunch restores the last checkpoint again and writes what is missing: a
``final/`` already on disk is kept (the export reads its params from there), so the outputs
do not depend on where an earlier launch was killed.

Dtypes (``train.precision``): the training checkpoints hold the state as trained (fp32 masters
and moments); ``final/`` holds every floating parameter in the model config's ``param_dtype``
(bf16 for the release configs, as upstream saves its bf16 model; the fp32 masters are rounded
to nearest), so ``stage:<name>`` and ``ckpt.orbax_io.load_params`` read what a release holds.
``vila/`` is written from ``final/``: an imported chain in the dtypes its source recorded
(``ckpt.vila_export``: bf16 for the released checkpoints), a random-init chain in
``param_dtype`` (``ckpt.fresh``).

Kill points of this phase (tests; ``LONGVILA_TEST_KILL`` as ``core.faults`` parses it, see
``train.kill_switch.KILL_SITES`` and ``COUNTED_SITES``): ``stage_transition@<steps>`` (in
``loop.run_stage``), the writers' counted points (``ckpt_group``, ``dir_commit``,
``export_file``), ``final_written@<steps>`` (``final/`` on disk, the export not begun),
``stage_done@<steps>`` (everything written, the ``final`` event not yet logged), and the
time-based kills of :func:`arm_kill`. In a multi-process job the writing runs in a child
process without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.fresh import write_vila
from longvila_jax.ckpt.pretrained import load_pretrained
from longvila_jax.ckpt.vila_export import export_vila
from longvila_jax.config.base import load_config, save_yaml
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import faults
from longvila_jax.train.precision import cast_floating
from longvila_jax.train.state import nest

FINAL_DIR = "final"
VILA_DIR = "vila"
_COMPONENT = {"llm": "llm", "vision": "vision_tower", "projector": "mm_projector"}


def barrier(name: str) -> None:
    """Waits for every process of a multi-process job (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


_TIMED = {"final_offset": None, "final_write": FINAL_DIR, "vila_write": VILA_DIR}


def arm_kill(run_dir: Path, step: int) -> None:
    """Test-only: arms a time-based kill of the final phase that begins now (``step``: the
    stage's last step); no-op unless ``$LONGVILA_TEST_KILL`` names one of these:

    - ``final_offset=<s>@<step>``: ``<s>`` seconds from now (not at all if the launch ends
      first);
    - ``final_write=<s>@<step>``, ``vila_write=<s>@<step>``: ``<s>`` seconds after this launch
      creates the temporary directory of ``final/`` (``vila/``), or as soon as that directory
      is renamed into place if that comes first (reported as ``(late)``).
    """
    armed = faults.armed()
    kind, eq, seconds = armed[0].partition("=") if armed else ("", "", "")
    if not eq or kind not in _TIMED or armed[1] != step:
        return
    offset, name = float(seconds), _TIMED[kind]
    label = f"{armed[0]}@{step}"
    old = set(run_dir.glob(f".{name}.tmp-*")) if name else set()  # stale: not this launch's

    def committed() -> None:
        if name and (run_dir / name).is_dir():
            faults.die(f"{armed[0]}(late)@{step}")

    def run():
        while name and not set(run_dir.glob(f".{name}.tmp-*")) - old:
            committed()
            time.sleep(0.0005)
        deadline = time.monotonic() + offset
        while time.monotonic() < deadline:
            committed()
            time.sleep(0.0005)
        faults.die(label)

    threading.Thread(target=run, daemon=True, name="kill-switch").start()


def remove_stale(parent: Path) -> None:
    """Removes the temporary dirs a killed launch left while writing ``final/`` or ``vila/``."""
    for name in (FINAL_DIR, VILA_DIR):
        for stale in parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def finish_stage(
    run_dir: Path,
    cfg: ModelConfig,
    flat: dict,
    like: Path | None,
    export_tokenizer: Path | None,
    *,
    step: int,
    event: Callable[..., None],
) -> None:
    """Writes ``final/`` (unless on disk) and, given ``export_tokenizer``, ``vila/``.

    Args:
      run_dir: the stage's run directory.
      cfg: the config of ``flat``.
      flat: flat params (``train.state`` names) of the finished state, LoRA merged, in any
        floating dtype (written in ``cfg.param_dtype``).
      like: the checkpoint the stage started from (None: random init).
      export_tokenizer: the data tokenizer for the VILA export, or None (no export).
      step: the stage's last step (keys the kill points).
      event: ``MetricsWriter.event``; logs ``final_written`` (single process) and ``final``.
    """
    out = run_dir / FINAL_DIR

    def written() -> None:
        event("final_written", step=step)
        faults.hit("final_written", step)

    write_final(out, cfg, flat, like, export_tokenizer, on_written=written)
    barrier("final-written")
    faults.hit("stage_done", step)
    event("final", path=str(out))


def _to_host(x) -> np.ndarray:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_final(
    out: Path,
    cfg: ModelConfig,
    flat: dict,
    like: Path | None,
    export_tokenizer: Path | None = None,
    *,
    on_written: Callable[[], None] | None = None,
) -> None:
    """Writes the stage's output as a project checkpoint (``ckpt.orbax_io`` layout), and its
    VILA layout (``<out>/../vila``) when ``export_tokenizer`` is given. Floating params are
    cast to ``cfg.param_dtype`` first (on device, before the copy to the host).

    In a multi-process job, process 0 does the writing in a single-process child: Orbax's v1
    saver used by ``ckpt.orbax_io`` synchronises every process of a distributed job, which the
    other processes (not writing) would never join. ``on_written`` (called once ``out`` exists,
    before the export) is then not called.
    """
    remove_stale(out.parent)
    stored = cast_floating(flat, cfg.param_dtype)
    host = {n: _to_host(v) for n, v in stored.items()}
    if jax.process_index() != 0:
        return
    if jax.process_count() == 1:
        finalize(out, cfg, host, like, export_tokenizer, on_written)
        return
    params_file = out.parent / ".final-params.safetensors"
    save_file({n: np.ascontiguousarray(v) for n, v in host.items()}, str(params_file))
    save_yaml(cfg, out.parent / ".final-model.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGVILA_", "SLURM_"))}
    env["JAX_PLATFORMS"] = "cpu"
    code = (
        "import sys; from longvila_jax.train.finish import finalize_from_files as f; "
        "f(*sys.argv[1:])"
    )
    args = [str(out), str(out.parent / ".final-model.yaml"), str(params_file)]
    args += [str(like or ""), str(export_tokenizer or "")]
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env)
    params_file.unlink()


def finalize_from_files(out: str, model_yaml: str, params: str, like: str, tok: str) -> None:
    """Child-process entry of :func:`write_final` (files written by the parent)."""
    cfg = load_config(ModelConfig, model_yaml)
    finalize(
        Path(out), cfg, load_file(params), Path(like) if like else None, Path(tok) if tok else None
    )


def finalize(
    out: Path,
    cfg: ModelConfig,
    host: dict,
    like: Path | None,
    export_tokenizer: Path | None,
    on_written: Callable[[], None] | None = None,
) -> None:
    """Writes the final project checkpoint (and the VILA export) from host arrays; a ``final/``
    already on disk is kept."""
    if not out.is_dir():
        if like is not None:
            orbax_io.save_checkpoint(out, cfg, nest(host), like=like)
        else:
            _write_random_final(out, cfg, host)
    if on_written is not None:
        on_written()
    if export_tokenizer is not None:
        export(out, out.parent / VILA_DIR, export_tokenizer)


def _write_random_final(out: Path, cfg: ModelConfig, host: dict) -> None:
    with orbax_io.checkpoint_dir(out) as tmp:
        orbax_io.write_metadata(tmp, cfg, {"source": {"layout": "random"}})
        writer = orbax_io.ParamWriter(tmp)
        for name, value in host.items():
            attr, *path = name.split("/")
            writer.save(_COMPONENT[attr], tuple(path), value)
        writer.finalize()


def export(final: Path, out: Path, tokenizer_dir: Path) -> None:
    """Writes the VILA layout of a stage's final checkpoint (LoRA is already merged there).

    A chain that started from an imported VILA/HF checkpoint reproduces that layout exactly
    (``ckpt.vila_export``); one that started from a random init gets a freshly generated layout
    (``ckpt.fresh``) with the data tokenizer ``tokenizer_dir``.
    """
    if out.is_dir():
        return
    layout = orbax_io.read_provenance(final).get("source", {}).get("layout")
    if layout in ("vila", "hf_parts"):
        export_vila(final, out)
        return
    write_vila(load_pretrained(final), tokenizer_dir, out)


def export_tokenizer_dir(data: Any) -> Path:
    """The tokenizer directory of a resolved data config (relative paths are under its root)."""
    tok = Path(data.tokenizer_dir)
    return tok if tok.is_absolute() else Path(data.root) / tok


__all__ = [
    "FINAL_DIR",
    "VILA_DIR",
    "arm_kill",
    "barrier",
    "export",
    "export_tokenizer_dir",
    "finalize",
    "finish_stage",
    "remove_stale",
    "write_final",
]
