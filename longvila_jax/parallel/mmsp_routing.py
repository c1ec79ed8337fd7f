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
  ``cap1 = ceil(b * frames_per_device * tpf / SP)``.
* hop 2: each intermediate forwards to the destinations. Tokens of one (source, destination)
  pair form one run of the dealing order, so an intermediate holds at most
  ``sum_s ceil(f(s, d) / SP) < n_d / SP + SP`` tokens for destination d:
  ``cap2 = min(b * L / SP, ceil(b * L / SP**2) + SP)``.

Per-device buffers are therefore [SP, cap1, D] ~ the local visual tokens and [SP, cap2, D] ~
L / SP (plus SP**2 tokens of slack), never the whole sequence. Text tokens, positions, segment
ids and the globally shifted labels are simply permuted here with the layout permutation and are
sharded like the sequence, so they travel with their tokens at no device cost.
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
      sp: sequence-parallel devices (ring * ulysses).
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
        """Visual tokens a device encodes: b * frames_per_device * tpf."""
        return self.rows_per_group * self.frames_per_device * self.tokens_per_frame

    @property
    def cap1(self) -> int:
        return max(1, -(-self.local_visual // self.sp))

    @property
    def cap2(self) -> int:
        local = self.rows_per_group * self.shard_len
        return max(1, min(local, -(-local // self.sp) + self.sp))


def frame_owners(n_real: int, sp: int, frames_per_device: int) -> np.ndarray:
    """Frame slot (device * frames_per_device + q) of each of a row's ``n_real`` frames.

    Device k owns frames [floor(k n / SP), floor((k+1) n / SP)): contiguous, balanced.
    """
    if n_real > sp * frames_per_device:
        raise ValueError(f"{n_real} frames do not fit {sp} x {frames_per_device} slots")
    k = np.arange(sp)
    starts = (k * n_real) // sp
    f = np.arange(n_real)
    dev = np.searchsorted(starts, f, side="right") - 1
    return (dev * frames_per_device + (f - starts[dev])).astype(np.int64)


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """Rank of every element among the elements with the same key, in array order."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    first = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    start = np.repeat(first, np.diff(np.r_[first, len(sk)]))
    out = np.empty_like(keys)
    out[order] = np.arange(len(sk)) - start
    return out


def routing_tables(
    geo: RoutingGeometry, visual_rank: np.ndarray, n_frames: np.ndarray, perm: np.ndarray
) -> dict[str, np.ndarray]:
    """Frame slots and the two-hop all-to-all tables of one micro-batch.

    Args:
      geo: static shapes.
      visual_rank: [B, L] int, natural order: index of a visual token within its row's visual
        tokens (frame j of the row, token t -> j * tpf + t), -1 for text and padding.
      n_frames: [B] real frames of every row (frames 0 .. n-1 of the data batch).
      perm: [L] layout permutation (``zigzag_2d_permutation``).

    Returns:
      ``frame_src`` [B, SP * frames_per_device]: data-batch frame index feeding each slot (-1 =
      empty slot); ``send1`` [G, SP, SP, cap1]: per source device, per intermediate, the flat
      index into the source's [b * frames_per_device * tpf] visual tokens (-1 = unused);
      ``send2`` [G, SP, SP, cap2]: per intermediate, per destination, the flat index into the
      intermediate's hop-1 receive buffer [SP * cap1]; ``recv`` [B, L] (layout order): index into
      the destination's hop-2 receive buffer [SP * cap2], -1 at text positions.

    Raises:
      ValueError: a row references a frame it does not have, or a rank below -1.
    """
    b, length = visual_rank.shape
    if (visual_rank < -1).any():
        r, c = np.argwhere(visual_rank < -1)[0]
        raise ValueError(
            f"visual_rank row {r}, position {c}: {int(visual_rank[r, c])} is neither -1 (text) "
            "nor a row-local visual token index"
        )
    sp, fpd, tpf, n_loc = geo.sp, geo.frames_per_device, geo.tokens_per_frame, geo.shard_len
    bl = geo.rows_per_group
    frame_src = np.full((b, sp * fpd), -1, np.int64)
    slot_of = []
    for r in range(b):
        slots = frame_owners(int(n_frames[r]), sp, fpd) if fpd else np.zeros(0, np.int64)
        frame_src[r, slots] = np.arange(len(slots))
        slot_of.append(slots)
    laid = visual_rank[:, perm]  # layout order: device d holds [d * n_loc, (d + 1) * n_loc)
    send1 = np.full((geo.groups, sp, sp, geo.cap1), -1, np.int64)
    send2 = np.full((geo.groups, sp, sp, geo.cap2), -1, np.int64)
    recv = np.full((b, length), -1, np.int64)
    for g in range(geo.groups):
        rows, cols = np.nonzero(laid[g * bl : (g + 1) * bl] >= 0)
        if rows.size == 0:
            continue
        v = laid[g * bl + rows, cols]
        frame, tok = v // tpf, v % tpf
        for r in np.unique(rows):
            bad = frame[rows == r] >= n_frames[g * bl + r]
            if bad.any():
                raise ValueError(
                    f"row {g * bl + r}: visual token of frame {int(frame[rows == r][bad][0])} "
                    f"but the row has {int(n_frames[g * bl + r])} frames"
                )
        slot = np.concatenate([slot_of[g * bl + r][frame[rows == r]] for r in np.unique(rows)])
        # np.nonzero is row-major, so concatenating per row restores the element order.
        src_dev, q = slot // fpd, slot % fpd
        src_flat = (rows * fpd + q) * tpf + tok
        dst_dev, j = cols // n_loc, cols % n_loc
        dst_flat = rows * n_loc + j
        order = np.lexsort((dst_flat, dst_dev, src_dev))
        src_dev, src_flat, dst_dev = src_dev[order], src_flat[order], dst_dev[order]
        rows, cols = rows[order], cols[order]
        inter = np.arange(len(order)) % sp
        c1 = _cumcount(src_dev * sp + inter)
        c2 = _cumcount(inter * sp + dst_dev)
        if c1.max() >= geo.cap1 or c2.max() >= geo.cap2:  # impossible by the bounds above
            raise RuntimeError(
                f"routing capacity exceeded ({c1.max() + 1}/{geo.cap1}, {c2.max() + 1}/{geo.cap2})"
            )
        send1[g, src_dev, inter, c1] = src_flat
        send2[g, inter, dst_dev, c2] = src_dev * geo.cap1 + c1
        recv[g * bl + rows, cols] = inter * geo.cap2 + c2
    return {
        "frame_src": frame_src,
        "send1": send1.astype(np.int32),
        "send2": send2.astype(np.int32),
        "recv": recv.astype(np.int32),
    }


def max_pair_flows(tables: dict[str, np.ndarray]) -> tuple[int, int]:
    """Largest number of tokens any device pair exchanges in hop 1 and hop 2 (diagnostics)."""
    return int((tables["send1"] >= 0).sum(-1).max()), int((tables["send2"] >= 0).sum(-1).max())


__all__ = [
    "RoutingGeometry",
    "frame_owners",
    "max_pair_flows",
    "routing_tables",
]
