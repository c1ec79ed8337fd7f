"""Checks of weights and checkpoint contents that several readers share.

- **Dtypes**: model parameters are floating point (F64/F32/F16/BF16). A tensor whose header
  says I32 for what is really F32 data would otherwise be cast integer -> float silently.
- **Finite values**: a NaN or Inf weight is refused where weights are read for a model
  (import, ``load_pretrained``), naming the tensor; ``allow_nonfinite`` turns the refusal into
  a logged warning. Arrays are checked as they are read, in bounded chunks, so no second full
  copy of the model (or even of one large leaf) is made.
- **Stored shapes vs the config**: a project checkpoint's ``model.yaml`` is compared with the
  shapes of the stored arrays (Orbax metadata, nothing is read) before anything is loaded,
  so a config that disagrees with its weights fails naming the parameter and both shapes
  instead of deep inside jax (or not at all).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.ckpt import mapping
from longvila_jax.ckpt.safetensors_io import DTYPE_NAMES
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.core.errors import CheckpointError, brief

log = logging.getLogger(__name__)

FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# Elements checked per step: bounds the temporary boolean mask to 16 MiB per chunk.
_FINITE_CHUNK = 16 << 20
# Top-level keys of a params tree (``orbax_io.ATTR`` values) -> VILA component.
_COMPONENT_OF = {"llm": "llm", "vision": "vision_tower", "projector": "mm_projector"}
_ALLOW_HINT = "pass --allow-nonfinite (allow_nonfinite=True) to accept it"


def is_float_dtype(dtype: Any) -> bool:
    """Whether a numpy dtype is one of the floating dtypes parameters may be stored in."""
    try:
        return DTYPE_NAMES.get(np.dtype(dtype)) in FLOAT_CODES
    except TypeError:
        return False


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN/Inf elements of a floating numpy array (0 for other dtypes), in chunks."""
    if not is_float_dtype(array.dtype):
        return 0
    flat = np.asarray(array).reshape(-1)
    bad = 0
    for start in range(0, flat.size, _FINITE_CHUNK):
        part = flat[start : start + _FINITE_CHUNK]
        bad += part.size - int(np.count_nonzero(np.isfinite(part)))
    return bad


def _nonfinite(what: str, detail: str, allow: bool) -> None:
    message = f"{what}: {detail}"
    if not allow:
        raise CheckpointError(f"{message}; {_ALLOW_HINT}")
    log.warning("%s (accepted: allow_nonfinite)", message)


def check_finite(array: np.ndarray, what: str, *, allow: bool = False) -> None:
    """Refuses (or, with ``allow``, logs) NaN/Inf values in a numpy array read from a file.

    Args:
      array: the tensor as read.
      what: names the file and tensor in the message.
      allow: log a warning instead of raising.

    Raises:
      CheckpointError: the array holds NaN or Inf and ``allow`` is false.
    """
    bad = count_nonfinite(array)
    if bad:
        _nonfinite(what, f"{bad} of {array.size} values are NaN or Inf", allow)


def _leaf_finite(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


@functools.cache
def _tree_finite():
    # One program for the whole tree (one compile per model, not one per leaf shape).
    return jax.jit(lambda tree: jax.tree.map(_leaf_finite, tree))


def check_finite_tree(tree: Mapping, where: str | os.PathLike, *, allow: bool = False) -> None:
    """``check_finite`` for a nested dict of (possibly sharded) jax arrays, computed where the
    arrays live (one jitted reduction per leaf: no gather to the host, no copy).

    Raises:
      CheckpointError: naming the first leaf (``a/b/c``) holding NaN or Inf, unless ``allow``.
    """
    flags = jax.device_get(_tree_finite()(tree))
    for path, ok in sorted(trees.flatten(flags).items()):
        if not bool(ok):
            _nonfinite(f"{where}: parameter {'/'.join(path)}", "holds NaN or Inf values", allow)


def check_stored_params(cfg: ModelConfig, tree: Mapping, where: str | os.PathLike) -> None:
    """Compares a checkpoint's stored params with the parameters ``cfg`` describes.

    Args:
      cfg: the checkpoint's (possibly overridden) model config.
      tree: ``orbax_io.stored_tree(ckpt)``: nested dict, leaf -> (shape, numpy dtype).
      where: the checkpoint, for messages.

    Raises:
      CheckpointError: a parameter missing, unexpected, of another shape (both shapes named)
        or of a non-floating dtype.
    """
    if not isinstance(tree, Mapping) or set(tree) != set(_COMPONENT_OF):
        keys = sorted(map(str, tree)) if isinstance(tree, Mapping) else brief(tree)
        raise CheckpointError(
            f"{where}: stored params hold {keys}, expected {sorted(_COMPONENT_OF)}"
        )
    for attr, component in _COMPONENT_OF.items():
        want = mapping.param_shapes(cfg, component)
        sub = tree[attr]
        got = trees.flatten(sub) if isinstance(sub, Mapping) else {(): sub}
        for path, shape in want.items():
            name = "/".join((attr, *path))
            if path not in got:
                raise CheckpointError(f"{where}: parameter {name} is missing from params/")
            stored_shape, dtype = got[path]
            if tuple(stored_shape) != tuple(shape):
                raise CheckpointError(
                    f"{where}: parameter {name} is stored with shape {list(stored_shape)}, "
                    f"model.yaml implies {list(shape)}"
                )
            if not is_float_dtype(dtype):
                raise CheckpointError(
                    f"{where}: parameter {name} is stored as {brief(str(dtype))}; parameters "
                    f"must be floating ({', '.join(FLOAT_CODES)})"
                )
        extra = sorted(set(got) - set(want))
        if extra:
            name = "/".join((attr, *extra[0]))
            raise CheckpointError(
                f"{where}: params/ holds {name}, which the model of model.yaml does not have"
            )


__all__ = [
    "FLOAT_CODES",
    "check_finite",
    "check_finite_tree",
    "check_stored_params",
    "count_nonfinite",
    "is_float_dtype",
]
