"""Token layouts for 2D (Ulysses x zigzag ring) sequence parallelism.

One static permutation is applied once per batch to tokens, positions, segment ids and labels
(labels shifted globally BEFORE it), and its inverse to outputs that need natural order; no
layer permutes anything.

Layout rule (parallelism.md section 4, longvila.md section 5.11 corrected): cut the row into 2R
chunks C_0..C_{2R-1}; ring rank r owns S_r = C_r || C_{2R-1-r}; cut S_r into U equal contiguous
pieces and give piece u to mesh shard r*U + u (device (r, u)). After the Ulysses all-to-all
(which concatenates pieces in u order), every device of ring rank r holds exactly S_r. The tests
check this against the dense causal mask and show that VILA's hybrid formula fails it
(``tests/parallel/_layout_oracles.py``).

The rows the layout permutes are *expanded* rows: every ``<image>`` placeholder already
replaced by its frame's visual-token slots. :func:`expand_packed_rows` does that for the data
pipeline's packed rows on the host (``models.vlm.expand_prompts`` is its counterpart for
unpacked prompts at inference).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
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
    if isinstance(x, np.ndarray):
        return x.take(perm, axis=axis)
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def undo_layout(x, perm: np.ndarray, axis: int = 1):
    """Inverse of ``apply_layout``."""
    return apply_layout(x, inverse_permutation(perm), axis)


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


def expand_packed_rows(
    batch: Mapping[str, np.ndarray], image_token_id: int, tokens_per_frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splice indices of the data pipeline's packed rows: where every text token and every
    visual token goes in the expanded row (host side, numpy).

    The pipeline packs several samples per row, unexpanded (one ``<image>`` per frame), and
    records for every text token its position in the expanded row (``text_to_expanded``);
    positions, segment ids and labels already come in the expanded layout. This fills the
    expanded rows: the text ids at their positions, and at the ``tokens_per_frame`` positions
    after each ``<image>`` the index of the visual token that belongs there. Unlike
    ``models.vlm.expand_prompts`` (unpacked prompts, indices over the whole batch), the visual
    indices are local to the row, so rows can be sharded over devices and hosts freely.

    Args:
      batch: pipeline batch (``data.pipeline`` layout): ``input_ids`` [B, T],
        ``text_to_expanded`` [B, T] (L or more for padding), ``frames`` [B, F, ...],
        ``segment_ids`` [B, L].
      image_token_id: the data tokenizer's ``<image>`` id.
      tokens_per_frame: visual tokens per frame.

    Returns:
      text_ids [B, L] int32 (0 at visual and pad positions) and visual_index [B, L] int32: index
      into the row's own [F * tokens_per_frame] visual tokens (frame j, token t ->
      j * tokens_per_frame + t), -1 for text.

    Raises:
      ValueError: a row has more ``<image>`` tokens than frame slots.
    """
    input_ids = np.asarray(batch["input_ids"])
    text_to_expanded = np.asarray(batch["text_to_expanded"])
    rows = input_ids.shape[0]
    length = batch["segment_ids"].shape[1]
    frame_slots = batch["frames"].shape[1]
    text_ids = np.zeros((rows, length), np.int32)
    visual_index = np.full((rows, length), -1, np.int32)
    is_image = input_ids == image_token_id
    offsets = np.arange(tokens_per_frame, dtype=np.int32)
    for r in range(rows):
        real = text_to_expanded[r] < length  # padding tokens point past the row
        text = real & ~is_image[r]
        text_ids[r, text_to_expanded[r, text]] = input_ids[r, text]
        image_cols = np.flatnonzero(real & is_image[r])
        if image_cols.size > frame_slots:
            raise ValueError(
                f"row {r}: {image_cols.size} <image> tokens but only {frame_slots} frame slots"
            )
        if image_cols.size:
            # The k-th <image> of the row is frame k; its tokens follow the placeholder's slot.
            slots = (text_to_expanded[r, image_cols][:, None] + offsets).reshape(-1)
            tokens = np.arange(image_cols.size)[:, None] * tokens_per_frame + offsets
            visual_index[r, slots] = tokens.reshape(-1)
    return text_ids, visual_index


__all__ = [
    "apply_layout",
    "expand_packed_rows",
    "inverse_permutation",
    "layout_batch",
    "shift_labels",
    "undo_layout",
    "zigzag_2d_permutation",
]
