"""Data pipeline configuration schema (instances live in ``configs/data/*.yaml``).

One ``DataConfig`` describes a weighted mixture of manifests, how media are decoded and sampled,
how conversations are templated and tokenised, and the static shapes of the packed rows the
pipeline yields (see ``longvila_jax.data.pipeline`` for the row layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from longvila_jax.config.base import check

DatasetKind = Literal["video", "image", "interleaved", "text", "coyo"]
# Captions per COYO item, as upstream's LazyCoyoDataset (n_samples_per_idx, llava/data/dataset.py
# on 386d350 and b760c34): consecutive manifest records form one item.
COYO_GROUP_SIZE = 4


@dataclass(frozen=True)
class DatasetSpec:
    """One manifest of the mixture.

    ``manifest`` and ``media_root`` are relative to ``DataConfig.root`` unless absolute. Media paths
    inside the manifest are resolved under ``media_root`` and must stay inside it.

    ``kind: coyo`` is upstream's stage-2 caption form (``LazyCoyoDataset``): every record is
    ``"<image>\n{caption}<eos>"`` with no chat template and no question, every text token
    supervised (see ``data.samples``). ``group_size`` consecutive records (default 4, as upstream)
    form one item of the mixture; each caption stays its own packed segment, all of an item's
    captions go into the same row, and a trailing incomplete group is dropped. Only ``coyo``
    groups records: other kinds accept only ``group_size`` 1 or null.
    """

    name: str
    manifest: str
    kind: DatasetKind
    media_root: str = ""
    weight: float = 1.0
    format: Literal["auto", "json", "jsonl", "arrayrecord"] = "auto"
    group_size: int | None = None  # None: COYO_GROUP_SIZE for coyo, 1 otherwise

    def __post_init__(self):
        check(bool(self.name), "name", "must be non-empty")
        if self.group_size is not None:
            check(self.group_size >= 1, "group_size", "must be >= 1 or null")
            check(
                self.kind == "coyo" or self.group_size == 1,
                "group_size",
                f"only kind coyo groups records (kind is {self.kind})",
            )
        check(bool(self.manifest), "manifest", "must be non-empty")
        check(self.weight > 0 and math.isfinite(self.weight), "weight", "must be finite and > 0")

    @property
    def records_per_item(self) -> int:
        """Manifest records that make one item of the mixture (one packed sample)."""
        if self.group_size is not None:
            return self.group_size
        return COYO_GROUP_SIZE if self.kind == "coyo" else 1


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings (mixture, decoding, templates, packing, resumption, bad input)."""

    root: str = "."
    datasets: tuple[DatasetSpec, ...] = ()
    # Local HF tokenizer directory (relative to root unless absolute); never fetched from the hub.
    tokenizer_dir: str = "tokenizer"
    template: Literal["qwen2", "llama_3"] = "qwen2"
    system_prompt: str | None = None  # None: the template's LongVILA default
    # Visual geometry: frames are resized to image_size^2; each <image> expands to
    # tokens_per_frame visual tokens (ModelConfig.tokens_per_frame).
    image_size: int = 384
    tokens_per_frame: int = 196
    # Video sampling (llava/mm_utils.py rule, data/video.py): num_video_frames uniformly (floor of
    # linspace, each frame at most once), fewer when max_fps > 0 and the video is shorter than
    # num_video_frames / max_fps seconds, or when it has fewer frames.
    num_video_frames: int = 8
    max_fps: float = 0.0
    min_video_frames: int = 2
    # Seek per frame when the mean gap between sampled frames exceeds this (about one GOP).
    seek_gap_frames: int = 60
    # Inert, kept so existing configs load (train/resolve still checks it is 1 or ring*ulysses):
    # frame counts are never rounded to a multiple of the SP degree, as upstream's longvideo_sft
    # (a LazySupervisedDataset) is not; MM-SP splits any frame count unevenly (longvila.md 5.4).
    # Leave it at 1.
    sp_degree: int = 1
    # Packed row shapes: expanded tokens (rounded up to pad_multiple), text tokens, frames, samples.
    max_length: int = 4096
    pad_multiple: int = 1
    max_text_tokens: int = 0  # 0: same as the row length
    max_frames_per_row: int = 8
    max_segments_per_row: int = 8
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever (reshuffled per epoch)
    worker_count: int = 0  # grain worker processes (mp_prefetch); 0 decodes in this process
    worker_buffer_size: int = 2
    read_threads: int = 1  # threads per process running the per-sample transform
    read_buffer_size: int = 4
    # Per-sample video decode timeout; decoding runs in a killable child process when > 0.
    decode_timeout_s: float = 60.0
    max_image_pixels: int | None = None  # None: keep Pillow's decompression-bomb limit
    skip_window: int = 1000
    max_skip_rate: float = 0.01
    too_long_policy: Literal["drop", "error"] = "drop"
    allow_manifest_change: bool = False
    # Debugging: every bad sample raises data.skips.SampleError (naming the sample and the skip
    # reason, chaining the cause) instead of being skipped and counted. Not part of the resume
    # or stream fingerprints: it never changes which rows come out, it only stops the run.
    fail_fast: bool = False

    def __post_init__(self):
        names = [d.name for d in self.datasets]
        check(len(set(names)) == len(names), "datasets", f"duplicate dataset names in {names}")
        for name in ("image_size", "tokens_per_frame", "num_video_frames", "sp_degree"):
            check(getattr(self, name) > 0, name, "must be positive")
        for name in ("max_length", "pad_multiple", "max_segments_per_row", "batch_size"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.max_frames_per_row >= 0, "max_frames_per_row", "must be >= 0")
        check(self.max_text_tokens >= 0, "max_text_tokens", "must be >= 0")
        check(self.min_video_frames >= 1, "min_video_frames", "must be >= 1")
        check(self.seek_gap_frames >= 1, "seek_gap_frames", "must be >= 1")
        check(self.max_fps >= 0 and math.isfinite(self.max_fps), "max_fps", "must be >= 0")
        check(self.worker_count >= 0, "worker_count", "must be >= 0")
        check(self.worker_buffer_size >= 1, "worker_buffer_size", "must be >= 1")
        check(self.read_threads >= 1, "read_threads", "must be >= 1")
        check(self.read_buffer_size >= 1, "read_buffer_size", "must be >= 1")
        check(self.decode_timeout_s >= 0, "decode_timeout_s", "must be >= 0 (0: no sandbox)")
        check(self.skip_window > 0, "skip_window", "must be positive")
        check(0 <= self.max_skip_rate <= 1, "max_skip_rate", "must lie in [0, 1]")
        check(self.num_epochs is None or self.num_epochs > 0, "num_epochs", "must be > 0 or null")
        check(
            self.max_image_pixels is None or self.max_image_pixels > 0,
            "max_image_pixels",
            "must be positive or null",
        )
        check(
            self.max_text_tokens <= self.row_length,
            "max_text_tokens",
            f"must be <= the row length {self.row_length}",
        )

    @property
    def row_length(self) -> int:
        """Static expanded length L of a packed row: max_length rounded up to pad_multiple."""
        return -(-self.max_length // self.pad_multiple) * self.pad_multiple

    @property
    def text_length(self) -> int:
        """Static unexpanded length T of ``input_ids`` in a packed row."""
        return self.max_text_tokens or self.row_length


__all__ = ["COYO_GROUP_SIZE", "DataConfig", "DatasetKind", "DatasetSpec"]
