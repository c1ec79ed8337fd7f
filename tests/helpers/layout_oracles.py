"""Test oracles of the 2D zigzag layout (parallelism.md section 4): a simulation of what a
chunk-arithmetic zigzag schedule computes for a layout, the dense causal pair set it must equal,
and VILA's hybrid repack formula, kept only to show that it fails the simulation.

None of this is library code: ``longvila_jax.parallel.layouts`` holds the layout itself.
"""

from __future__ import annotations

import numpy as np


def vila_hybrid_permutation(seq_len: int, ring: int, ulysses: int) -> np.ndarray:
    """Upstream VILA hybrid repack (device (u, r) takes chunks r + 2R*u and SP-r-1 + 2R*u of a
    2*SP split): the formula the tests show to be wrong for U > 1.

    Returns:
      [L] global order (shard r*U + u); indices may repeat or fall outside the row (-1 marks
      an out-of-range chunk), which the simulation reports as invalid.
    """
    sp = ring * ulysses
    n_chunks = 2 * sp
    size = seq_len // n_chunks
    order = []
    for r in range(ring):
        for u in range(ulysses):
            for cid in (r + 2 * ring * u, sp - r - 1 + 2 * ring * u):
                if 0 <= cid < n_chunks:
                    order.append(np.arange(cid * size, (cid + 1) * size))
                else:
                    order.append(np.full(size, -1))
    return np.concatenate(order).astype(np.int32)


def simulate_zigzag_schedule(perm: np.ndarray, ring: int, ulysses: int) -> set[tuple[int, int]]:
    """(query, key) token pairs a chunk-arithmetic zigzag kernel computes for a layout.

    Models the pipeline: layout -> Ulysses all-to-all (rank r gathers its U pieces in u order)
    -> the classic zigzag schedule, whose masks assume the local block is C_r || C_{2R-1-r}
    (step 0: causal on local index order; j < r: all local q vs front half of kv from rank j;
    j > r: back half of local q vs all kv). Compare with the dense causal pair set.

    Returns:
      The set of (q_token, k_token) pairs, tokens as natural indices (-1 for invalid slots).
    """
    shard = len(perm) // (ring * ulysses)
    blocks = [perm[r * ulysses * shard : (r + 1) * ulysses * shard] for r in range(ring)]
    pairs: set[tuple[int, int]] = set()
    for r in range(ring):
        q = blocks[r]
        half = len(q) // 2
        for s in range(ring):
            j = (r - s) % ring
            kv = blocks[j]
            if s == 0:
                pairs.update((int(q[a]), int(q[b])) for a in range(len(q)) for b in range(a + 1))
            elif j < r:
                pairs.update((int(a), int(b)) for a in q for b in kv[:half])
            else:
                pairs.update((int(a), int(b)) for a in q[half:] for b in kv)
    return pairs


def dense_causal_pairs(seq_len: int) -> set[tuple[int, int]]:
    """All (q, k) pairs with k <= q: what a correct layout + schedule must compute."""
    return {(a, b) for a in range(seq_len) for b in range(a + 1)}
