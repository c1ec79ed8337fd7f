"""The project checkpoint directory: ModelConfig YAML, Orbax params, provenance, HF files.

Layout of ``<ckpt>/``::

    model.yaml        ModelConfig (load with ``config.base.load_config``)
    provenance.json   source layout, original configs' shard plans and dtypes, SigLIP spelling
    hf/               verbatim (non-weight) files of the source: config.json, llm/tokenizer.json ...
    unused/<c>.safetensors   real tensors the model does not use, kept for export
    params/           Orbax (v1) pytree {"vision": ..., "projector": ..., "llm": ...} whose
                      sub-trees are ``nnx.to_pure_dict(nnx.state(model.<attr>))``

Params are written leaf by leaf with Orbax partial saves, so a converter never holds more than
one (stacked) parameter; the result is an ordinary Orbax pytree checkpoint that restores whole,
with any target sharding, via ``load_params``. The whole directory is built under a temporary
sibling name and renamed into place at the end: on any error no output directory remains.

Readers treat a checkpoint as hostile: ``verify_checkpoint`` checks the per-file SHA-256
manifest before anything is read, ``provenance.json`` is validated field by field
(``ckpt.provenance``), and the stored shapes are compared with ``model.yaml``
(``ckpt.checks.check_stored_params``) before any array is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from longvila_jax.ckpt import provenance
from longvila_jax.ckpt.checks import check_stored_params
from longvila_jax.config.base import load_config, save_yaml
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import faults, trees
from longvila_jax.core.errors import CheckpointError, brief
from longvila_jax.core.manifest import MANIFEST_FILE, verify_dir, write_manifest
from longvila_jax.core.safe_paths import copy_tree, prepare_parent

MODEL_YAML = "model.yaml"
PROVENANCE = "provenance.json"
PARAMS = "params"
HF_DIR = "hf"
UNUSED_DIR = "unused"
FORMAT = provenance.FORMAT
# VILA sub-folder -> attribute of the LongVILA model (and top-level key of the params tree).
ATTR = {"llm": "llm", "vision_tower": "vision", "mm_projector": "projector"}


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``out`` only if the block succeeds.

    Raises:
      FileExistsError: ``out`` already exists (never overwritten).
      CheckpointError: ``out`` cannot be created (a parent is a file, permission denied).
    """
    out = Path(out)
    if os.path.lexists(out):
        raise FileExistsError(f"{out} already exists; refusing to overwrite it")
    prepare_parent(out, "output")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"output: cannot create {out} ({e.strerror})") from None
    try:
        yield tmp
        faults.hit("dir_commit")  # test kill point: complete, not yet renamed
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def checkpoint_dir(out: str | Path) -> Iterator[Path]:
    """``atomic_dir`` for a project checkpoint: when the block succeeds, the per-file SHA-256
    manifest (``core.manifest``) is written into the temporary directory before the rename,
    so every visible project checkpoint carries one.

    Raises:
      FileExistsError: ``out`` already exists (never overwritten).
    """
    with atomic_dir(out) as tmp:
        yield tmp
        write_manifest(tmp)


def verify_checkpoint(ckpt: str | Path) -> None:
    """Checks a project checkpoint against its integrity manifest before anything is read.

    Raises:
      CheckpointError: naming the first bad file (missing, changed, unlisted, a link) or a
        missing or unreadable manifest.
    """
    ckpt = Path(ckpt)
    problem = verify_dir(ckpt, None, required=(MODEL_YAML, PROVENANCE))
    if problem is not None:
        hint = ""
        if problem.startswith(f"{MANIFEST_FILE}: missing"):
            hint = (
                " (checkpoints written before integrity manifests existed can be sealed with "
                "`python -m longvila_jax.convert seal --ckpt DIR` once you trust them)"
            )
        raise CheckpointError(f"{ckpt}: integrity check failed: {problem}{hint}")


def params_dir(ckpt: str | Path) -> Path:
    """The Orbax params directory of a project checkpoint, absolute (Orbax refuses relative)."""
    return Path(ckpt).absolute() / PARAMS


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise, inflating peak RSS)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ParamWriter:
    """Adds parameter leaves to ``<ckpt>/params`` in bounded groups (Orbax partial saves).

    Leaves are buffered until they reach ``group_bytes`` and then saved together, so memory
    stays within about ``group_bytes`` plus one leaf while small leaves do not each pay the
    cost of a separate save.
    """

    def __init__(self, ckpt_dir: str | Path, group_bytes: int = 16 << 20):
        import orbax.checkpoint.experimental.v1 as ocp

        self._ocp = ocp
        self.path = params_dir(ckpt_dir)
        self.group_bytes = group_bytes
        self.count = 0
        self._pending: dict = {}
        self._pending_bytes = 0

    def save(self, component: str, path: tuple[str, ...], value: np.ndarray) -> None:
        """Queues leaf ``path`` of ``component`` ("llm", "vision_tower", "mm_projector")."""
        value = np.asarray(value)
        node = self._pending.setdefault(ATTR[component], {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        self._pending_bytes += value.nbytes
        self.count += 1
        if self._pending_bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        import jax

        if self._pending:
            # On the CPU backend device_put aliases a 64-byte aligned numpy buffer, and Orbax
            # writes a jax array without another copy; handing it numpy costs two copies.
            # The CPU device also keeps conversions off accelerator memory.
            cpu = jax.local_devices(backend="cpu")[0]
            self._ocp.partial.save(self.path, jax.device_put(self._pending, cpu))
            faults.hit("ckpt_group")  # test kill point: one group of leaves saved
        self._pending, self._pending_bytes = {}, 0
        release_freed_memory()

    def finalize(self) -> None:
        """Writes what is queued and commits the Orbax checkpoint."""
        if self.count == 0:
            raise ValueError(f"{self.path}: no parameters were written")
        self.flush()
        self._ocp.partial.finalize(self.path)


def is_project_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_YAML).is_file() and (path / PARAMS).is_dir()


def read_model_config(ckpt: str | Path, overrides=()) -> ModelConfig:
    return load_config(ModelConfig, Path(ckpt) / MODEL_YAML, overrides)


def read_provenance(ckpt: str | Path) -> dict:
    """The validated ``provenance.json`` of a project checkpoint (``ckpt.provenance``).

    Raises:
      CheckpointError: unreadable or invalid, naming the field.
    """
    return provenance.read(Path(ckpt) / PROVENANCE)


def write_metadata(tmp: Path, cfg: ModelConfig, record: Mapping) -> None:
    """Writes ``model.yaml`` and ``provenance.json`` (validated first: what we write must
    read back) into checkpoint directory ``tmp``."""
    data = provenance.validate({"format": FORMAT, **record}, "provenance")
    save_yaml(cfg, tmp / MODEL_YAML)
    (tmp / PROVENANCE).write_text(json.dumps(data, indent=1) + "\n")


def stored_tree(ckpt: str | Path) -> dict:
    """Nested dict of the stored params: leaf -> (shape, numpy dtype). Reads metadata only.

    Raises:
      CheckpointError: the Orbax metadata is missing or malformed.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    def conv(node):
        if isinstance(node, Mapping):
            return {str(k): conv(v) for k, v in node.items()}
        return (tuple(int(d) for d in node.shape), np.dtype(node.dtype))

    # Orbax parses files of the (possibly hostile) checkpoint; whatever it or the conversion
    # raises on malformed metadata becomes an error naming the checkpoint.
    try:
        return conv(ocp.metadata(params_dir(ckpt)).metadata)
    except _ORBAX_ERRORS as e:
        raise CheckpointError(
            f"{ckpt}: cannot read the parameter metadata in {PARAMS}/ ({brief(str(e))})"
        ) from None


def load_leaves(
    ckpt: str | Path, component: str, paths: list[tuple[str, ...]], tree: Mapping | None = None
) -> dict[tuple[str, ...], np.ndarray]:
    """Loads some stored parameter leaves as numpy in their stored dtype (the rest is skipped).

    Args:
      ckpt: project checkpoint.
      component: "llm", "vision_tower" or "mm_projector".
      paths: leaf paths inside the component.
      tree: ``stored_tree(ckpt)`` when the caller already has it.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    tree = tree if tree is not None else stored_tree(ckpt)
    wanted = {(ATTR[component], *p) for p in paths}

    def target(p, spec):
        return np.empty(spec[0], spec[1]) if p in wanted else ocp.PLACEHOLDER

    out = _load(ckpt, trees.map_with_path(tree, target))
    result = {}
    for p in paths:
        node = out[ATTR[component]]
        for key in p:
            node = node[key]
        result[p] = node
    return result


def load_params(
    ckpt: str | Path, *, dtype: str | None = None, shardings: Any = None, verify: bool = True
) -> dict:
    """Restores all params as jax arrays.

    Args:
      ckpt: project checkpoint directory.
      dtype: cast every leaf to this dtype on load (None keeps the stored dtypes).
      shardings: None (first device) or a pytree of ``jax.sharding.Sharding`` matching the
        params tree (``{"vision": ..., "projector": ..., "llm": ...}``).
      verify: check the integrity manifest first (``verify_checkpoint``); pass False only
        right after verifying the same checkpoint.

    Returns:
      {"vision": pure dict, "projector": pure dict, "llm": pure dict}.

    Raises:
      CheckpointError: the checkpoint fails its integrity check or its metadata is malformed.
    """
    if verify:
        verify_checkpoint(ckpt)
    return _restore(ckpt, stored_tree(ckpt), dtype, shardings)


def _restore(ckpt: str | Path, tree: Mapping, dtype: str | None, shardings: Any) -> dict:
    import jax

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(p, spec):
        sh = default
        if shardings is not None:
            sh = shardings
            for k in p:
                sh = sh[k]
        return jax.ShapeDtypeStruct(spec[0], np.dtype(dtype) if dtype else spec[1], sharding=sh)

    return _load(ckpt, trees.map_with_path(tree, target))


# What Orbax/tensorstore raise on malformed (not merely missing) checkpoint files.
_ORBAX_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


def _load(ckpt: str | Path, target: Mapping) -> Any:
    """``ocp.load`` of the params; failures on malformed files name the checkpoint."""
    import orbax.checkpoint.experimental.v1 as ocp

    try:
        return ocp.load(params_dir(ckpt), target)
    except _ORBAX_ERRORS as e:
        raise CheckpointError(f"{ckpt}: cannot restore {PARAMS}/ ({brief(str(e))})") from None


def save_checkpoint(
    out: str | Path, cfg: ModelConfig, params: Mapping, *, like: str | Path
) -> None:
    """Writes a project checkpoint from in-memory params (e.g. after training).

    Provenance, HF files and unused tensors are carried over from checkpoint ``like`` (the one
    the run started from), so the result exports to the same VILA layout; changed config
    fields (say a new ``rope_theta``) are written into the exported JSON configs. ``like`` is
    verified against its manifest first, so nothing tampered with is carried into (and then
    sealed by the manifest of) the new checkpoint.

    Args:
      out: new directory (must not exist).
      cfg: the config of ``params``.
      params: {"vision", "projector", "llm"} -> pure dicts of arrays (nnx.to_pure_dict).
      like: an existing project checkpoint.

    Raises:
      CheckpointError: ``like`` fails its integrity check, has an invalid provenance, or holds
        a link or special file where regular files are copied.
    """
    like = Path(like)
    verify_checkpoint(like)
    prov = read_provenance(like)
    prov.pop("format", None)
    with checkpoint_dir(out) as tmp:
        for name in (HF_DIR, UNUSED_DIR):
            if (like / name).is_dir():
                copy_tree(like / name, tmp / name, name)
        write_metadata(tmp, cfg, prov)
        writer = ParamWriter(tmp)
        inv = {v: k for k, v in ATTR.items()}
        for attr, sub in params.items():
            for path, value in trees.leaves(sub):
                writer.save(inv[attr], path, np.asarray(value))
        writer.finalize()


def load_checkpoint(
    ckpt: str | Path, *, dtype: str | None = None, shardings: Any = None, overrides=()
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a project checkpoint; see ``load_params`` for the arguments.

    The checkpoint is verified against its manifest and its stored shapes are compared with
    the config before anything is loaded. ``pretrained.load_pretrained`` returns a ready
    model instead.

    Raises:
      CheckpointError: integrity failure, or stored params that disagree with the config.
      ConfigError: ``model.yaml`` is invalid.
    """
    verify_checkpoint(ckpt)
    cfg = read_model_config(ckpt, overrides)
    tree = stored_tree(ckpt)
    check_stored_params(cfg, tree, ckpt)
    return cfg, _restore(ckpt, tree, dtype, shardings)
