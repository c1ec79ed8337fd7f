"""The input pipeline: manifests -> grain -> packed, static-shape, resumable batches.

Chain (per host)::

    ManifestSource per dataset -> MapDataset.shuffle(seed + i).repeat(num_epochs)
    -> MapDataset.mix(weights) -> [process_index::process_count]
    -> map(SampleProcessor)            # decode, template, tokenise; bad sample -> skip marker
    -> to_iter_dataset(ReadOptions) -> mp_prefetch(worker_count)   # when worker_count > 0
    -> PackIterDataset                 # main process: count skips, pack rows
    -> DataIterator                    # stack batch_size rows, fingerprints, state

Each batch from ``DataIterator`` is a dict of numpy arrays with a leading batch dim B
(``batch_size``); per row (L = ``cfg.row_length``, T = ``cfg.text_length``, F =
``max_frames_per_row``, S = ``max_segments_per_row``, P = ``image_size``):

================== ================= =========================================================
key                shape / dtype     meaning
================== ================= =========================================================
input_ids          [B, T] int32      unexpanded tokens, one ``<image>`` per frame; pad = pad id
text_segment_ids   [B, T] int32      segment (sample) of each text token, 1-based; 0 = pad
text_to_expanded   [B, T] int32      expanded index of each token (first visual slot of an
                                     ``<image>``); L for padding (scatter with mode="drop")
frames             [B, F, P, P, 3]   float32, ``(x / 255 - 0.5) / 0.5``, channels last, in
                                     ``<image>`` order; zeros where ``frame_mask`` is False
frame_mask         [B, F] bool       real frames
frame_segment_ids  [B, F] int32      segment of each frame; 0 = pad
segment_ids        [B, L] int32      expanded sequence; 1-based per sample, 0 = padding
positions          [B, L] int32      restart at 0 in every segment
labels             [B, L] int32      ``labels[t]`` = target of position t (already shifted);
                                     -100 where none (prompt, visual, last token of a segment)
sample_index       [B, S] int64      ``dataset_number << 40 | record_index`` per segment; -1 pad
================== ================= =========================================================

The expanded length of a sample is ``text tokens + frames * (tokens_per_frame - 1)``; each frame
occupies ``tokens_per_frame`` visual tokens plus its ``"\\n"`` text token. ``get_state`` returns a
JSON-serialisable dict (grain state, skip counters, manifest fingerprints); ``set_state`` refuses a
state whose manifests or stream-shaping config differ unless ``allow_manifest_change`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import grain
import numpy as np

from longvila_jax.config.base import check
from longvila_jax.config.data import DataConfig
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.errors import ConfigError, InputError
from longvila_jax.data.packing import PackIterDataset, RowShape
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.sources import GroupedSource, ManifestError, ManifestSource, open_source
from longvila_jax.data.text import image_token_id, load_tokenizer

STATE_VERSION = 1
# Fields that do not change which elements come out, in which order (moving the data is fine;
# ``fail_fast`` only turns a skip into an error, so a run may resume with or without it;
# ``sp_degree`` is inert, see config/data.py).
_NOT_STREAM_SHAPING = (
    "root",
    "sp_degree",
    "allow_manifest_change",
    "decode_timeout_s",
    "read_buffer_size",
    "fail_fast",
)


def check_model_compat(cfg: DataConfig, model: ModelConfig) -> None:
    """Checks that data and model agree on frame size, visual tokens and the ``<image>`` id.

    Raises:
      ConfigError: naming the disagreeing data field (the tokenizer's ``<image>`` id is reported
        as ``tokenizer_dir``).
    """
    check(
        cfg.image_size == model.vision.image_size,
        "image_size",
        f"{cfg.image_size} != model vision.image_size {model.vision.image_size}",
    )
    check(
        cfg.tokens_per_frame == model.tokens_per_frame,
        "tokens_per_frame",
        f"{cfg.tokens_per_frame} != model tokens_per_frame {model.tokens_per_frame}",
    )
    tok_id = image_token_id(load_tokenizer(_resolve(Path(cfg.root), cfg.tokenizer_dir)))
    check(
        tok_id == model.image_token_id,
        "tokenizer_dir",
        f"tokenizer <image> id {tok_id} != model image_token_id {model.image_token_id}",
    )


class DatasetChanged(InputError):
    """A restored iterator state does not match the current manifests or config."""


def _resolve(root: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else root / p


def build_sources(cfg: DataConfig) -> list[ManifestSource | GroupedSource]:
    """One source per dataset of the mixture (grouped for ``coyo``, see ``DatasetSpec``).

    Raises:
      ManifestError: naming the dataset and file of a manifest that cannot be read.
    """
    root = Path(cfg.root)
    return [
        open_source(_resolve(root, d.manifest), d.name, d.format, d.records_per_item)
        for d in cfg.datasets
    ]


def stream_fingerprint(cfg: DataConfig) -> str:
    """SHA-256 of the config fields that shape the stream."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_STREAM_SHAPING}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def build_dataset(
    cfg: DataConfig,
    sources: list[ManifestSource | GroupedSource] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PackIterDataset:
    """The grain ``IterDataset`` of packed rows for this host (see the module docstring).

    Raises:
      ConfigError: the mixture lists no dataset.
      ManifestError: a manifest cannot be read or has no records.
    """
    if not cfg.datasets:
        raise ConfigError("datasets", "the mixture lists no dataset")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    sources = sources if sources is not None else build_sources(cfg)
    parts = []
    for i, src in enumerate(sources):
        if len(src) == 0:
            raise ManifestError(f"dataset {src.dataset!r}: manifest {src.path} has no records")
        ds = grain.MapDataset.source(src)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + i)
        parts.append(ds.repeat(cfg.num_epochs))
    weights = [d.weight for d in cfg.datasets]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds[process_index::process_count]
    ds = ds.map(SampleProcessor(cfg))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    )
    if cfg.worker_count > 0:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    tok = load_tokenizer(_resolve(Path(cfg.root), cfg.tokenizer_dir))
    shape = RowShape(
        length=cfg.row_length,
        text_length=cfg.text_length,
        max_frames=cfg.max_frames_per_row,
        max_segments=cfg.max_segments_per_row,
        image_size=cfg.image_size,
        tokens_per_frame=cfg.tokens_per_frame,
        image_token_id=image_token_id(tok),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    return PackIterDataset(it_ds, shape, cfg.skip_window, cfg.max_skip_rate)


def _mark_absl_flags_parsed() -> None:
    # google/grain#1355: mp_prefetch reads absl flags, which are unparsed outside absl.app.run.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator:
    """Batches of packed rows with checkpointable state.

    Args:
      cfg: the data config.
      process_index, process_count: host shard (default: ``jax.process_index/count``). The
        trainer passes its data shard (``parallel.host_shards``): the processes of one
        sequence-parallel group must read the same rows.

    Worker processes (``worker_count > 0``) need the usual ``if __name__ == "__main__"`` guard in
    the launching script; call ``close()`` when done.
    """

    def __init__(
        self, cfg: DataConfig, process_index: int | None = None, process_count: int | None = None
    ):
        self.cfg = cfg
        sources = build_sources(cfg)
        self.fingerprints = {s.dataset: s.fingerprint for s in sources}
        self.manifests = {s.dataset: str(s.path) for s in sources}
        self.config_fingerprint = stream_fingerprint(cfg)
        self._pack = iter(build_dataset(cfg, sources, process_index, process_count))

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.cfg.batch_size):
            try:
                rows.append(next(self._pack))
            except StopIteration:
                break
        if len(rows) < self.cfg.batch_size:
            # A partial batch would change static shapes; the remainder is dropped.
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason so far."""
        return dict(self._pack.skips.counts)

    @property
    def samples_seen(self) -> int:
        return self._pack.skips.seen

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state to store with the checkpoint."""
        return {
            "version": STATE_VERSION,
            "pack": self._pack.get_state(),
            "fingerprints": dict(self.fingerprints),
            "config": self.config_fingerprint,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a ``get_state`` result.

        Raises:
          DatasetChanged: a manifest was added, removed or rewritten, or a stream-shaping config
            field changed, and ``allow_manifest_change`` is False.
        """
        if state.get("version") != STATE_VERSION:
            raise DatasetChanged(f"iterator state version {state.get('version')} is unsupported")
        if not self.cfg.allow_manifest_change:
            old, new = state["fingerprints"], self.fingerprints
            for name in sorted(set(old) | set(new)):
                if name not in new:
                    raise DatasetChanged(f"dataset {name!r} was in the checkpoint but is gone")
                if name not in old:
                    raise DatasetChanged(f"dataset {name!r} ({self.manifests[name]}) is new")
                if old[name] != new[name]:
                    raise DatasetChanged(
                        f"manifest of dataset {name!r} ({self.manifests[name]}) changed since the "
                        "checkpoint; set allow_manifest_change to resume anyway"
                    )
            if state["config"] != self.config_fingerprint:
                raise DatasetChanged(
                    "data config fields that shape the stream (mixture weights, seed, shapes, "
                    "sampling, worker_count...) changed since the checkpoint; set "
                    "allow_manifest_change to resume anyway"
                )
        self._pack.set_state(state["pack"])

    def close(self) -> None:
        close = getattr(self._pack._parent, "close", None)
        if close is not None:
            close()


__all__ = [
    "DataIterator",
    "DatasetChanged",
    "build_dataset",
    "build_sources",
    "check_model_compat",
    "stream_fingerprint",
]
