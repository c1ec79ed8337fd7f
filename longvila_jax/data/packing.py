"""Sequence packing into static-shape rows, with exact resumable state and skip accounting.

Samples are packed greedily in stream order (next-fit): a row is closed when the next sample would
overflow its expanded length, text length, frame budget or segment budget, and that sample opens
the next row. grain's ``FirstFitPackIterDataset`` packs each feature by its own length, but here a
sample's cost in the expanded sequence (text + frames x (tokens_per_frame - 1)) differs from every
feature length and frames need their own budget, so packing is done here in ~100 lines.

Labels are built in the expanded layout and shifted globally, before any sequence-parallel
permutation: ``labels[t]`` is the token at ``t + 1`` when that is a supervised text token of the
same segment, else ``IGNORE_INDEX``; so the last position of every segment is ignored and the first
token of a sample is never a target.

A grouped sample (``coyo``: a ``parts`` array of per-record token counts) is packed as a unit,
all its records in the same row, each record its own segment.

State: the iterator remembers the parent state taken just before the sample it holds back for the
next row (the only buffered element), plus the skip counters at that point; ``set_state`` rewinds
the parent there, so the stream after a restore equals the uninterrupted one at every position.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain
import numpy as np

from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.data.image import normalize
from longvila_jax.data.skips import SkipCounter, is_skip


@dataclasses.dataclass(frozen=True)
class RowShape:
    """Static shapes of a packed row and the ids needed to fill it."""

    length: int  # L: expanded sequence length
    text_length: int  # T: unexpanded input_ids length
    max_frames: int  # F
    max_segments: int  # S
    image_size: int
    tokens_per_frame: int
    image_token_id: int
    pad_id: int


def expand_segment(
    input_ids: np.ndarray, supervised: np.ndarray, image_token_id: int, tokens_per_frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shifted labels of one sample in the expanded layout.

    Args:
      input_ids: int32 [n] with one ``image_token_id`` per frame.
      supervised: bool [n], True on target tokens.
      image_token_id: the ``<image>`` id.
      tokens_per_frame: visual tokens each ``<image>`` expands to.

    Returns:
      labels: int32 [m], m = n + n_images * (tokens_per_frame - 1); ``labels[t]`` = target of t.
      starts: int32 [n], index in the expanded sample where each text token lands (the first
        visual slot for an ``<image>``).
    """
    is_img = input_ids == image_token_id
    width = np.where(is_img, tokens_per_frame, 1)
    starts = np.cumsum(width) - width
    labels = np.full(int(width.sum()), IGNORE_INDEX, dtype=np.int32)
    target = supervised & ~is_img & (starts > 0)
    labels[starts[target] - 1] = input_ids[target]
    return labels, starts.astype(np.int32)


def _parts(sample: dict[str, Any]) -> list[int]:
    """Token counts of the records of ``sample`` (one record unless it is grouped)."""
    parts = sample.get("parts")
    return [len(sample["input_ids"])] if parts is None else [int(n) for n in parts]


class RowBuilder:
    """Accumulates samples and emits one packed row (see ``pipeline`` for the keys)."""

    def __init__(self, shape: RowShape):
        self.shape = shape
        self.samples: list[dict[str, Any]] = []
        self.used_length = self.used_text = self.used_frames = self.used_segments = 0

    def cost(self, sample: dict[str, Any]) -> tuple[int, int, int]:
        n, f = len(sample["input_ids"]), len(sample["frames"])
        return n + f * (self.shape.tokens_per_frame - 1), n, f

    def fits(self, sample: dict[str, Any]) -> bool:
        length, text, frames = self.cost(sample)
        s = self.shape
        return (
            self.used_segments + len(_parts(sample)) <= s.max_segments
            and self.used_length + length <= s.length
            and self.used_text + text <= s.text_length
            and self.used_frames + frames <= s.max_frames
        )

    def add(self, sample: dict[str, Any]) -> None:
        length, text, frames = self.cost(sample)
        self.samples.append(sample)
        self.used_length += length
        self.used_text += text
        self.used_frames += frames
        self.used_segments += len(_parts(sample))

    def build(self) -> dict[str, np.ndarray]:
        s = self.shape
        row = {
            "input_ids": np.full(s.text_length, s.pad_id, np.int32),
            "text_segment_ids": np.zeros(s.text_length, np.int32),
            "text_to_expanded": np.full(s.text_length, s.length, np.int32),
            "frames": np.zeros((s.max_frames, s.image_size, s.image_size, 3), np.float32),
            "frame_mask": np.zeros(s.max_frames, bool),
            "frame_segment_ids": np.zeros(s.max_frames, np.int32),
            "segment_ids": np.zeros(s.length, np.int32),
            "positions": np.zeros(s.length, np.int32),
            "labels": np.full(s.length, IGNORE_INDEX, np.int32),
            "sample_index": np.full(s.max_segments, -1, np.int64),
        }
        t = f = e = seg = 0
        for sample in self.samples:
            lo = flo = 0
            parts = _parts(sample)
            for j, n in enumerate(parts):
                seg += 1
                ids = sample["input_ids"][lo : lo + n]
                # A record's frames are its <image> tokens' (checked in samples._check).
                k = (
                    len(sample["frames"])
                    if len(parts) == 1
                    else int(np.sum(ids == s.image_token_id))
                )
                frames = sample["frames"][flo : flo + k]
                labels, starts = expand_segment(
                    ids, sample["supervised"][lo : lo + n], s.image_token_id, s.tokens_per_frame
                )
                m = len(labels)
                row["input_ids"][t : t + n] = ids
                row["text_segment_ids"][t : t + n] = seg
                row["text_to_expanded"][t : t + n] = starts + e
                if k:
                    row["frames"][f : f + k] = normalize(frames)
                row["frame_mask"][f : f + k] = True
                row["frame_segment_ids"][f : f + k] = seg
                row["segment_ids"][e : e + m] = seg
                row["positions"][e : e + m] = np.arange(m, dtype=np.int32)
                row["labels"][e : e + m] = labels
                row["sample_index"][seg - 1] = sample["sample_index"] + j
                t, f, e, lo, flo = t + n, f + k, e + m, lo + n, flo + k
        return row


class PackDatasetIterator(grain.DatasetIterator):
    """Packs the parent's samples into rows; counts and logs skip markers."""

    def __init__(self, parent, shape: RowShape, skip_window: int, max_skip_rate: float):
        super().__init__(parent)
        self.shape = shape
        self.skips = SkipCounter(skip_window, max_skip_rate)
        self._held: dict[str, Any] | None = None
        self._held_state: dict[str, Any] | None = None

    def _fetch(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Next good sample and the state just before it (skips are counted on the way)."""
        while True:
            before = {
                "parent": copy.deepcopy(self._parent.get_state()),
                "skips": self.skips.get_state(),
            }
            element = next(self._parent)
            if is_skip(element):
                self.skips.skip(element["skip_reason"], element["sample_id"], element["detail"])
                continue
            self.skips.ok()
            return element, before

    def __next__(self) -> dict[str, np.ndarray]:
        builder = RowBuilder(self.shape)
        if self._held is not None:
            builder.add(self._held)
            self._held = self._held_state = None
        while True:
            try:
                sample, before = self._fetch()
            except StopIteration:
                if builder.samples:
                    return builder.build()
                raise
            if builder.fits(sample):
                builder.add(sample)
            else:
                self._held, self._held_state = sample, before
                return builder.build()

    def get_state(self) -> dict[str, Any]:
        if self._held_state is not None:
            return copy.deepcopy(self._held_state)
        return {"parent": copy.deepcopy(self._parent.get_state()), "skips": self.skips.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skips.set_state(state["skips"])
        self._held = self._held_state = None

    def __str__(self) -> str:
        return f"PackDatasetIterator(length={self.shape.length})"


class PackIterDataset(grain.IterDataset):
    """``IterDataset`` of packed rows over an ``IterDataset`` of samples and skip markers."""

    def __init__(self, parent, shape: RowShape, skip_window: int, max_skip_rate: float):
        super().__init__(parent)
        self.shape = shape
        self.skip_window = skip_window
        self.max_skip_rate = max_skip_rate

    def __iter__(self) -> PackDatasetIterator:
        return PackDatasetIterator(
            self._parent.__iter__(), self.shape, self.skip_window, self.max_skip_rate
        )

    def __str__(self) -> str:
        return f"PackIterDataset(length={self.shape.length})"


__all__ = ["PackDatasetIterator", "PackIterDataset", "RowBuilder", "RowShape", "expand_segment"]
