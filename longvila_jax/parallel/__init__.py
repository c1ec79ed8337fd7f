"""Sequence parallelism: device meshes, Ulysses all-to-all, zigzag ring attention, 2D layouts and
the MM-SP model sharding.

Public names are imported lazily (importing ``longvila_jax.parallel.mesh`` does not pull in
the kernels). The axis names live in the leaf layer, ``longvila_jax.core.axes``.

Naming rule for ``jax.shard_map``: a per-device block of a global array carries the suffix
``_local`` (``q_local``, ``labels_local``), in the bodies (``attention``, ``mmsp``) and in the
arguments of the functions that only ever receive blocks (``ring.ring_attention_local``,
``ulysses``); a plain name is a global array. The block kernels of ``ring_kernels`` work on any
block (the decoder also calls them) and name arrays by layout (``qh``, ``kh``, ``qT``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "make_mmsp_attention": "attention",
    "mmsp_attention": "attention",
    "MeshConfig": "mesh",
    "load_mesh_config": "mesh",
    "make_mesh": "mesh",
    "validate_mesh": "mesh",
    "logical_to_spec": "mesh",
    "zigzag_2d_permutation": "layouts",
    "inverse_permutation": "layouts",
    "apply_layout": "layouts",
    "undo_layout": "layouts",
    "shift_labels": "layouts",
    "layout_batch": "layouts",
    "kv_replication": "ulysses",
    "resolve_block_kernel": "block_kernel",
    "MMSPPlan": "mmsp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"longvila_jax.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'longvila_jax.parallel' has no attribute {name!r}")
