"""Shared inputs and error metrics for the MM-SP attention tests (also used by the multi-process
worker, which imports this file by path)."""

from __future__ import annotations

import numpy as np

# Tests compile many tiny ring graphs; LLVM optimisation level 0 halves XLA:CPU compile time and
# does not change the HLO (numerics are the same ops, no fast-math).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    """``jax.jit`` with ``FAST_COMPILE`` (jax imported lazily: this module is also data-only)."""
    import jax

    return jax.jit(fn, compiler_options=FAST_COMPILE)


def packed_inputs(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    dim: int,
    seed: int = 0,
    restart_positions: bool = False,
) -> dict[str, np.ndarray]:
    """Random q/k/v in natural order with packed rows and a padded tail.

    Row 0 packs three segments whose boundaries (at 0.3 T and 0.7 T) fall inside shards for
    every tested mesh; rows 1, 3, ... hold two segments and a padded tail of T/8 tokens; row 2
    (if any) is all padding (no visible key anywhere).
    Positions are the token order, or restart at each segment when ``restart_positions``.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, dim), dtype=np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, dim), dtype=np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, dim), dtype=np.float32)
    seg = np.ones((batch, seq), np.int32)
    a, b = int(0.3 * seq) + 1, int(0.7 * seq) - 1
    seg[0, a:b] = 2
    seg[0, b:] = 3
    for row in range(1, batch):
        seg[row, seq // 2 - 3 :] = 2
        seg[row, seq - seq // 8 :] = 0
    if batch > 2:
        seg[2] = 0
    pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    if restart_positions:
        for row in range(batch):
            for s in np.unique(seg[row]):
                idx = np.nonzero(seg[row] == s)[0]
                pos[row, idx] = np.arange(len(idx))
    return {"q": q, "k": k, "v": v, "segment_ids": seg, "positions": pos}


def max_abs(x, y) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


def max_rel(x, y) -> float:
    """Max abs error normalised by the reference's max magnitude (element-wise relative error
    is undefined on the exactly-zero gradients of padding rows)."""
    y = np.asarray(y, np.float64)
    return max_abs(x, y) / float(np.max(np.abs(y)))
