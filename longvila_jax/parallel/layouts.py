"""Token layouts for 2D (Ulysses x zigzag ring) sequence parallelism.

One static permutation is applied once per batch to tokens, positions, segment ids and labels
(labels shifted globally BEFORE it), and its inverse to outputs that need natural order; no
layer permutes anything.

Layout rule (parallelism.md section 4, longvila.md section 5.11 corrected): cut the row into 2R
chunks C_0..C_{2R-1}; ring rank r owns S_r = C_r || C_{2R-1-r}; cut S_r into U equal contiguous
pieces and give piece u to mesh shard r*U + u (device (r, u)). After the Ulysses all-to-all
(which concatenates pieces in u order), every device of ring rank r holds exactly S_r.

``vila_hybrid_permutation`` reproduces the upstream VILA hybrid formula only so that a test can
show it is not a valid layout; never use it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from longvila_jax.core.labels import IGNORE_INDEX


def zigzag_2d_permutation(seq_len: int, ring: int, ulysses: int) -> np.ndarray:
    """Global index order of the 2D zigzag layout.

    Args:
      seq_len: L, divisible by 2 * ring * ulysses.
      ring: R; ulysses: U.

    Returns:
      int array ``perm`` [L] with ``laid_out = natural[perm]``; shard r*U+u holds the slice
      ``perm[(r*U+u)*L/(R*U) : (r*U+u+1)*L/(R*U)]``.
    """
    if ring < 1 or ulysses < 1:
        raise ValueError(f"ring ({ring}) and ulysses ({ulysses}) must be >= 1")
    if seq_len % (2 * ring * ulysses):
        raise ValueError(
            f"seq_len {seq_len} must be divisible by 2 * ring * ulysses = {2 * ring * ulysses}"
        )
    chunks = np.arange(seq_len).reshape(2 * ring, seq_len // (2 * ring))
    pairs = [np.concatenate([chunks[r], chunks[2 * ring - 1 - r]]) for r in range(ring)]
    # S_r is already cut into U contiguous pieces in order, so concatenating S_0..S_{R-1}
    # gives shards r*U + u in mesh order.
    return np.concatenate(pairs).astype(np.int32)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """Returns ``inv`` with ``natural = laid_out[inv]``."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def apply_layout(x, perm: np.ndarray, axis: int = 1):
    """Permutes the sequence axis (``x[:, perm]`` for axis 1); works on numpy and jax arrays."""
    return x.take(perm, axis=axis) if isinstance(x, np.ndarray) else _jnp_take(x, perm, axis)


def undo_layout(x, perm: np.ndarray, axis: int = 1):
    """Inverse of ``apply_layout``."""
    return apply_layout(x, inverse_permutation(perm), axis)


def _jnp_take(x, perm, axis):
    import jax.numpy as jnp  # numpy callers (data pipeline) need not import jax

    return jnp.take(x, jnp.asarray(perm), axis=axis)


def shift_labels(labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Next-token targets on the natural order: out[:, t] = labels[:, t+1], last = ignore.

    Must run before ``apply_layout``: a shard-local shift would lose one target per shard edge
    and, under zigzag, train the end of C_r against the start of C_{2R-1-r}.
    """
    out = np.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def layout_batch(
    batch: Mapping[str, np.ndarray], perm: np.ndarray, seq_keys: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Applies one layout to every [batch, seq, ...] field (tokens, positions, segment ids, labels).

    Args:
      batch: name -> array with the sequence on axis 1; labels must already be shifted.
      perm: from ``zigzag_2d_permutation``.
      seq_keys: fields to permute (default: all fields whose axis 1 has length len(perm)).

    Returns:
      A new dict; fields not permuted are passed through.
    """
    keys = (
        seq_keys
        if seq_keys is not None
        else tuple(k for k, v in batch.items() if np.ndim(v) >= 2 and v.shape[1] == len(perm))
    )
    out = dict(batch)
    for key in keys:
        if key not in batch:
            raise KeyError(f"layout_batch: field {key!r} not in batch ({sorted(batch)})")
        if batch[key].shape[1] != len(perm):
            raise ValueError(
                f"layout_batch: field {key!r} has seq length {batch[key].shape[1]}, "
                f"layout expects {len(perm)}"
            )
        out[key] = apply_layout(batch[key], perm)
    return out


def vila_hybrid_permutation(seq_len: int, ring: int, ulysses: int) -> np.ndarray:
    """Upstream VILA hybrid repack (device (u, r) takes chunks r + 2R*u and SP-r-1 + 2R*u of a
    2*SP split). Kept only to demonstrate in tests that it is wrong for U > 1.

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
    n = ring * ulysses
    shard = len(perm) // n
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


def packed_splice_indices(
    batch: Mapping[str, np.ndarray], image_token_id: int, tokens_per_frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where the packed rows' text tokens and visual tokens go in the expanded layout (host side).

    The data pipeline packs unexpanded ids (one ``<image>`` per frame) plus, for every text
    token, its expanded position (``text_to_expanded``); this fills the expanded rows: the text
    ids at their positions, and at the ``tokens_per_frame`` positions after each ``<image>``
    the index of the visual token that belongs there. (``models.vlm.expand_inputs`` does the
    same for unpacked prompts at inference.)

    Args:
      batch: pipeline batch (``data.pipeline`` layout): ``input_ids`` [B, T],
        ``text_to_expanded`` [B, T], ``frames`` [B, F, ...], ``segment_ids`` [B, L].
      image_token_id: the data tokenizer's ``<image>`` id.
      tokens_per_frame: visual tokens per frame.

    Returns:
      text_ids [B, L] int32 (0 at visual and pad positions) and visual_index [B, L] int32: index
      into the row's own [F * tokens_per_frame] visual tokens, -1 for text. Indices are local to
      the row so that rows can be sharded over devices and hosts freely.
    """
    ids = np.asarray(batch["input_ids"])
    dst = np.asarray(batch["text_to_expanded"])
    b, t = ids.shape
    length = batch["segment_ids"].shape[1]
    n_frames = batch["frames"].shape[1]
    text_ids = np.zeros((b, length), np.int32)
    visual = np.full((b, length), -1, np.int32)
    is_img = ids == image_token_id
    offs = np.arange(tokens_per_frame, dtype=np.int32)
    for r in range(b):
        real = dst[r] < length
        txt = real & ~is_img[r]
        text_ids[r, dst[r, txt]] = ids[r, txt]
        cols = np.flatnonzero(real & is_img[r])
        if cols.size > n_frames:
            raise ValueError(f"row {r}: {cols.size} <image> tokens but only {n_frames} frame slots")
        if cols.size:
            slots = (dst[r, cols][:, None] + offs).reshape(-1)
            frame = np.arange(cols.size)[:, None] * tokens_per_frame + offs
            visual[r, slots] = frame.reshape(-1)
    return text_ids, visual
