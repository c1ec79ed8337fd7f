"""Host-side plan of MM-SP's two stages: frame ownership (stage 1) and token routing (stage 2).

Stage 1 (longvila.md §5.4): the real frames of every row are split into SP contiguous, balanced
groups (counts differ by at most one; rank 0 owns the first frames), so each sequence-parallel
device encodes ``frames_per_device`` frame slots per row; unused slots are zero frames whose
tokens are never routed. A row with fewer frames than SP devices simply leaves slots empty.

Stage 2 (§5.5, without upstream's whole-sequence all-reduce, §11 bug 4): every visual token must
reach the device that owns its position in the 2D zigzag layout (``layouts``). Flows between a
frame owner and a layout owner are skewed and data dependent, while ``all_to_all`` needs one
static capacity per device pair, so routing takes two balanced hops (Valiant style):

* hop 1: the tokens of the SP group, ordered by (source, destination, slot), are dealt
  round-robin over the SP devices (the intermediates). Each source's tokens form one run, so a
  source sends at most ``ceil(n_source / SP)`` tokens to any intermediate: capacity
  ``hop1_capacity = ceil(b * frames_per_device * tokens_per_frame / SP)``.
* hop 2: each intermediate forwards to the destinations. Tokens of one (source, destination)
  pair form one run of the dealing order, so an intermediate holds at most
  ``sum_s ceil(f(s, d) / SP) < n_d / SP + SP`` tokens for destination d:
  ``hop2_capacity = min(b * L / SP, ceil(b * L / SP**2) + SP)``.

Per-device buffers are therefore [SP, hop1_capacity, D] ~ the local visual tokens and
[SP, hop2_capacity, D] ~ L / SP (plus SP**2 tokens of slack), never the whole sequence. Text
tokens, positions, segment ids and the globally shifted labels are simply permuted here with
the layout permutation and are sharded like the sequence, so they travel with their tokens at
no device cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoutingGeometry:
    """Static shapes of one MM-SP micro-batch.

    Attributes:
      rows: global rows B of a micro-batch; groups: data-parallel groups (batch shards) G.
      seq_len: expanded row length L (multiple of 2 * SP).
      sp: sequence-parallel devices SP (ring * ulysses).
      frame_slots: frame slots F per row in the data batch.
      tokens_per_frame: visual tokens per frame.
    """

    rows: int
    groups: int
    seq_len: int
    sp: int
    frame_slots: int
    tokens_per_frame: int

    def __post_init__(self):
        if self.rows % self.groups:
            raise ValueError(f"rows {self.rows} not divisible by the batch shards {self.groups}")
        if self.seq_len % (2 * self.sp):
            raise ValueError(f"seq_len {self.seq_len} must be divisible by 2 * SP = {2 * self.sp}")

    @property
    def rows_per_group(self) -> int:
        """Rows b of one batch group (the rows one SP group of devices holds)."""
        return self.rows // self.groups

    @property
    def shard_len(self) -> int:
        """Tokens of a row on one device (L / SP)."""
        return self.seq_len // self.sp

    @property
    def frames_per_device(self) -> int:
        """Frame slots per row and device: ceil(F / SP) (at least 1 when F > 0)."""
        return -(-self.frame_slots // self.sp)

    @property
    def local_visual(self) -> int:
        """Visual tokens a device encodes: b * frames_per_device * tokens_per_frame."""
        return self.rows_per_group * self.frames_per_device * self.tokens_per_frame

    @property
    def hop1_capacity(self) -> int:
        """Tokens one device sends to one intermediate in hop 1 (module docstring)."""
        return max(1, -(-self.local_visual // self.sp))

    @property
    def hop2_capacity(self) -> int:
        """Tokens one intermediate sends to one destination in hop 2 (module docstring)."""
        local = self.rows_per_group * self.shard_len
        return max(1, min(local, -(-local // self.sp) + self.sp))


def frame_owners(n_real: int, sp: int, frames_per_device: int) -> np.ndarray:
    """Frame slot (device * frames_per_device + q) of each of a row's ``n_real`` frames.

    Device k owns frames [floor(k n / SP), floor((k+1) n / SP)): contiguous, balanced.
    """
    if n_real > sp * frames_per_device:
        raise ValueError(f"{n_real} frames do not fit {sp} x {frames_per_device} slots")
    device_ids = np.arange(sp)
    starts = (device_ids * n_real) // sp
    frames = np.arange(n_real)
    owner = np.searchsorted(starts, frames, side="right") - 1
    return (owner * frames_per_device + (frames - starts[owner])).astype(np.int64)


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """Rank of every element among the elements with the same key, in array order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    start = np.repeat(first, np.diff(np.r_[first, len(sorted_keys)]))
    out = np.empty_like(keys)
    out[order] = np.arange(len(sorted_keys)) - start
    return out


def routing_tables(
    geometry: RoutingGeometry, visual_rank: np.ndarray, n_frames: np.ndarray, perm: np.ndarray
) -> dict[str, np.ndarray]:
    """Frame slots and the two-hop all-to-all tables of one micro-batch.

    Args:
      geometry: static shapes.
      visual_rank: [B, L] int, natural order: index of a visual token within its row's visual
        tokens (frame j of the row, token t -> j * tokens_per_frame + t), -1 for text and
        padding.
      n_frames: [B] real frames of every row (frames 0 .. n-1 of the data batch).
      perm: [L] layout permutation (``zigzag_2d_permutation``).

    Returns:
      ``frame_src`` [B, SP * frames_per_device]: data-batch frame index feeding each slot (-1 =
      empty slot); ``send1`` [G, SP, SP, hop1_capacity]: per source device, per intermediate,
      the flat index into the source's [b * frames_per_device * tokens_per_frame] visual tokens
      (-1 = unused); ``send2`` [G, SP, SP, hop2_capacity]: per intermediate, per destination,
      the flat index into the intermediate's hop-1 receive buffer [SP * hop1_capacity];
      ``recv`` [B, L] (layout order): index into the destination's hop-2 receive buffer
      [SP * hop2_capacity], -1 at text positions.

    Raises:
      ValueError: a row references a frame it does not have, or a rank below -1.
    """
    rows, length = visual_rank.shape
    if (visual_rank < -1).any():
        r, c = np.argwhere(visual_rank < -1)[0]
        raise ValueError(
            f"visual_rank row {r}, position {c}: {int(visual_rank[r, c])} is neither -1 (text) "
            "nor a row-local visual token index"
        )
    sp = geometry.sp
    frames_per_device = geometry.frames_per_device
    tokens_per_frame = geometry.tokens_per_frame
    shard_len, rows_per_group = geometry.shard_len, geometry.rows_per_group
    hop1_capacity, hop2_capacity = geometry.hop1_capacity, geometry.hop2_capacity
    # Stage 1: the slot (owning device, slot on it) of every real frame of every row.
    frame_src = np.full((rows, sp * frames_per_device), -1, np.int64)
    slot_of_frame = []
    for r in range(rows):
        slots = (
            frame_owners(int(n_frames[r]), sp, frames_per_device)
            if frames_per_device
            else np.zeros(0, np.int64)
        )
        frame_src[r, slots] = np.arange(len(slots))
        slot_of_frame.append(slots)
    # Layout order: device d holds positions [d * shard_len, (d + 1) * shard_len) of a row.
    laid_rank = visual_rank[:, perm]
    send1 = np.full((geometry.groups, sp, sp, hop1_capacity), -1, np.int64)
    send2 = np.full((geometry.groups, sp, sp, hop2_capacity), -1, np.int64)
    recv = np.full((rows, length), -1, np.int64)
    # Routing never crosses a batch group: every group is one SP group of devices on its own.
    for g in range(geometry.groups):
        first_row = g * rows_per_group
        group_rank = laid_rank[first_row : first_row + rows_per_group]
        # One entry per visual token of the group: its row in the group and its layout column.
        row, col = np.nonzero(group_rank >= 0)
        if row.size == 0:
            continue
        rank = group_rank[row, col]
        frame, token = rank // tokens_per_frame, rank % tokens_per_frame
        for r in np.unique(row):
            bad = frame[row == r] >= n_frames[first_row + r]
            if bad.any():
                raise ValueError(
                    f"row {first_row + r}: visual token of frame {int(frame[row == r][bad][0])} "
                    f"but the row has {int(n_frames[first_row + r])} frames"
                )
        # np.nonzero is row-major, so concatenating per row restores the element order.
        slot = np.concatenate(
            [slot_of_frame[first_row + r][frame[row == r]] for r in np.unique(row)]
        )
        # Source: the device encoding the token's frame, and the token's index in that device's
        # [b, frames_per_device, tokens_per_frame] output. Destination: the device holding the
        # token's layout column, and its index in that device's [b, shard_len] block.
        src_device, slot_on_device = slot // frames_per_device, slot % frames_per_device
        src_flat = (row * frames_per_device + slot_on_device) * tokens_per_frame + token
        dst_device, column_on_device = col // shard_len, col % shard_len
        dst_flat = row * shard_len + column_on_device
        # Deal the tokens sorted by (source, destination, slot) round-robin over the devices:
        # each source's tokens and each (source, destination) pair's tokens are one run of that
        # order, which is what bounds both hops' capacities (module docstring).
        order = np.lexsort((dst_flat, dst_device, src_device))
        src_device, src_flat, dst_device = src_device[order], src_flat[order], dst_device[order]
        row, col = row[order], col[order]
        intermediate = np.arange(len(order)) % sp
        # Slot of each token in its (source -> intermediate) and (intermediate -> destination)
        # buffers: its rank among the tokens that share the pair.
        hop1_slot = _cumcount(src_device * sp + intermediate)
        hop2_slot = _cumcount(intermediate * sp + dst_device)
        # Impossible by the bounds of the module docstring; checked so a wrong bound fails loudly
        # instead of silently overwriting another token's slot.
        if hop1_slot.max() >= hop1_capacity or hop2_slot.max() >= hop2_capacity:
            raise RuntimeError(
                f"routing capacity exceeded ({hop1_slot.max() + 1}/{hop1_capacity}, "
                f"{hop2_slot.max() + 1}/{hop2_capacity})"
            )
        send1[g, src_device, intermediate, hop1_slot] = src_flat
        # The intermediate's hop-1 receive buffer is [SP sources, hop1_capacity] flattened (tiled
        # all_to_all), so the token sits at src_device * hop1_capacity + hop1_slot there.
        send2[g, intermediate, dst_device, hop2_slot] = src_device * hop1_capacity + hop1_slot
        # Likewise the destination's hop-2 receive buffer is [SP intermediates, hop2_capacity]:
        # the layout slot (row, col) reads its token from there.
        recv[first_row + row, col] = intermediate * hop2_capacity + hop2_slot
    return {
        "frame_src": frame_src,
        "send1": send1.astype(np.int32),
        "send2": send2.astype(np.int32),
        "recv": recv.astype(np.int32),
    }


__all__ = ["RoutingGeometry", "frame_owners", "routing_tables"]
