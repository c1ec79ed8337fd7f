"""``load_pretrained``: a ready LongVILA model from a VILA-layout or a project checkpoint.

A VILA-layout directory is converted in memory with the same streaming, validating path as the
file converter (tensors read one at a time, names and shapes checked against the config); a
project checkpoint is restored with Orbax. Either way no random initialisation runs: the model
is built abstractly (``nnx.eval_shape``) and the loaded arrays are merged in. Tokenizers load
from local files only, never from the hub and never with remote code.

Both paths treat the files as hostile: a project checkpoint is verified against its integrity
manifest and its stored shapes are compared with ``model.yaml`` before anything is loaded;
every floating leaf is checked for NaN/Inf as it is read (``allow_nonfinite`` turns the
refusal into a warning); the tokenizer's folder is checked (manifest, or no FIFOs and no links
out of the source) before transformers opens anything in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from longvila_jax.ckpt import checks, hf_config, integrity, orbax_io
from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.ckpt.vila_import import iter_leaves, plan_component
from longvila_jax.config.model import ModelConfig
from longvila_jax.core import trees
from longvila_jax.core.errors import CheckpointError
from longvila_jax.core.safe_paths import check_folder
from longvila_jax.models.vlm import LongVILA


def _is_vila(path: Path) -> bool:
    return (path / "config.json").is_file() and all(
        (path / c).is_dir() for c in hf_config.COMPONENTS
    )


def _with_dtype(cfg: ModelConfig, dtype: Any) -> ModelConfig:
    if dtype is None:
        return cfg
    name = np.dtype(dtype).name
    return dataclasses.replace(cfg, param_dtype=name, compute_dtype=name)


def read_vila_params(
    path: str | Path,
    *,
    dtype: Any = None,
    overrides: Sequence[str] = (),
    allow_nonfinite: bool = False,
) -> tuple[ModelConfig, dict]:
    """Reads a VILA-layout directory into (config, params) without writing anything.

    Args:
      path: the VILA-layout directory.
      dtype: parameter dtype (None: the stored LLM dtype).
      overrides: dotted ``ModelConfig`` overrides.
      allow_nonfinite: accept NaN/Inf weights with a warning instead of refusing them.

    Returns:
      The config and ``{"vision": ..., "projector": ..., "llm": ...}`` pure dicts of jax arrays
      in ``cfg.param_dtype``.

    Raises:
      ConfigError, CheckpointError: a malformed, inconsistent or unsafe source (named).
    """
    import jax.numpy as jnp

    path = Path(path)
    data, source = hf_config.read_vila(path)
    weights = {c: WeightSet(source.dirs[c], path) for c in hf_config.COMPONENTS}
    tokenizer = hf_config.load_tokenizer_dir(source.dirs["llm"], root=path)
    cfg = _with_dtype(hf_config.build_config(data, tokenizer, weights, overrides), dtype)
    pdtype = jnp.dtype(cfg.param_dtype)
    params = {}
    for comp in hf_config.COMPONENTS:
        plan = plan_component(cfg, comp, weights[comp])
        leaves = iter_leaves(cfg, plan, dtype=pdtype, allow_nonfinite=allow_nonfinite)
        params[orbax_io.ATTR[comp]] = trees.unflatten((p, jnp.asarray(v)) for p, v in leaves)
    return cfg, params


def read_project_params(
    path: str | Path,
    *,
    dtype: Any = None,
    overrides: Sequence[str] = (),
    allow_nonfinite: bool = False,
) -> tuple[ModelConfig, dict]:
    """(config, params) of a project checkpoint, checked before and while it is read.

    The manifest is verified and the stored shapes are compared with ``model.yaml`` before
    any array is loaded; then every floating leaf is checked for NaN/Inf.

    Raises:
      CheckpointError: integrity failure, shape disagreement or non-finite weights (named).
      ConfigError: ``model.yaml`` is invalid.
    """
    orbax_io.verify_checkpoint(path)
    cfg = _with_dtype(orbax_io.read_model_config(path, overrides), dtype)
    tree = orbax_io.stored_tree(path)
    checks.check_stored_params(cfg, tree, path)
    params = orbax_io.load_params(path, dtype=cfg.param_dtype, verify=False)
    checks.check_finite_tree(params, path, allow=allow_nonfinite)
    return cfg, params


def load_pretrained(
    path: str | Path,
    *,
    dtype: Any = None,
    attn_fn: Any = None,
    overrides: Sequence[str] = (),
    allow_nonfinite: bool = False,
):
    """Builds a ``LongVILA`` model with weights from ``path``.

    Args:
      path: a VILA/LongVILA-layout directory (``config.json`` + ``llm/``, ``vision_tower/``,
        ``mm_projector/``) or a project checkpoint (``longvila_jax.convert import`` output).
      dtype: parameter and compute dtype (e.g. ``"float32"``, ``jnp.bfloat16``); None keeps
        the config's.
      attn_fn: LLM attention kernel (``core.attention.AttentionFn``); None = dense.
      overrides: dotted ``ModelConfig`` overrides (``projector.token_order=col_major``).
      allow_nonfinite: accept NaN/Inf weights with a logged warning instead of refusing them.

    Returns:
      A ``longvila_jax.models.vlm.LongVILA`` whose ``cfg`` describes it.

    Raises:
      CheckpointError: ``path`` is neither layout, fails its integrity check, or holds
        tampered, mis-shaped or non-finite weights (named).
      ConfigError: an invalid or inconsistent config (field named).
    """
    path = Path(path)
    kw = dict(dtype=dtype, overrides=overrides, allow_nonfinite=allow_nonfinite)
    if orbax_io.is_project_checkpoint(path):
        cfg, params = read_project_params(path, **kw)
    elif _is_vila(path):
        cfg, params = read_vila_params(path, **kw)
    else:
        raise CheckpointError(
            f"{path} is neither a project checkpoint (model.yaml + params/) nor a VILA layout "
            "(config.json + llm/ + vision_tower/ + mm_projector/)"
        )
    kwargs = {} if attn_fn is None else {"attn_fn": attn_fn}
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    missing = sorted(set(pure) - set(params))
    if missing:
        raise CheckpointError(f"{path}: the model has state {missing} that the checkpoint lacks")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def tokenizer_dir(path: str | Path) -> Path:
    """The folder holding the LLM tokenizer of a project checkpoint, VILA layout or HF LLM,
    checked before anything in it is read.

    For a project checkpoint the tokenizer files are verified against the checkpoint's
    integrity manifest (``integrity.verify_files``: only what the tokenizer reads is hashed,
    not the weights); otherwise the folder may hold no FIFO and no link out of ``path``.

    Raises:
      CheckpointError: a tampered, special or out-of-tree file (named).
    """
    path = Path(path)
    if orbax_io.is_project_checkpoint(path):
        integrity.verify_files(path, f"{orbax_io.HF_DIR}/llm")
        return path / orbax_io.HF_DIR / "llm"
    folder = path / "llm" if _is_vila(path) else path
    check_folder(folder, path, "tokenizer")
    return folder


def load_tokenizer(path: str | Path):
    """The tokenizer (``transformers`` fast tokenizer) of any of the three layouts, offline."""
    return hf_config.load_tokenizer_dir(tokenizer_dir(path))
