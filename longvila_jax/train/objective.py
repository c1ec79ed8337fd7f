"""The training objective: how a host batch becomes device arrays, and the loss of one micro-batch.

The loop and the jitted step only talk to an :class:`Objective`, so sequence parallelism can
replace this whole piece (frames sharded over the SP devices, tokens moved into the 2D zigzag
layout) without touching the loop. ``stage.objective`` picks one of two (``OBJECTIVES``):

- ``dense`` (:class:`DenseObjective`): dense attention, the batch sharded over the mesh's batch
  axes and replicated over the sequence axes, so every device sees whole rows;
- ``mmsp`` (:class:`MMSPObjective`): the stage's configs handed to ``parallel.mmsp.MMSPPlan``,
  which holds the whole MM-SP pipeline (frames sharded, two-hop routing, 2D attention).

The dense objective splices visual tokens with the model's own ``LongVILA.embed``; MM-SP routes
them to their layout slots instead. Both compute the loss with ``core.loss.token_ce_sum``.
Contract of ``Objective.loss``: it returns the *sum* of token cross-entropies and the *number* of
supervised tokens of one micro-batch; the step divides the sums over all micro-batches (and,
through GSPMD, all devices), giving the global token mean of issue 5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.config.base import check
from longvila_jax.core import tokens
from longvila_jax.core.loss import token_ce_sum
from longvila_jax.data.text import load_tokenizer
from longvila_jax.parallel.host_shards import data_shard
from longvila_jax.parallel.layouts import expand_packed_rows
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.train.resolve import ResolvedStage


class Objective(Protocol):
    """What the trainer needs from an objective."""

    def to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's batch -> global device arrays with a leading [grad_accum] axis."""
        ...

    def shardings(self) -> dict[str, NamedSharding]:
        """Sharding of every array ``to_device`` returns (for the step's in_shardings)."""
        ...

    def loss(self, model: Any, micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(sum of CE over supervised tokens, number of supervised tokens), traced."""
        ...


class DenseObjective:
    """Dense attention; batch over the mesh's ``batch`` rule axes, replicated elsewhere.

    Args:
      resolved: the resolved stage.
      mesh: the device mesh.
      image_token_id: the data tokenizer's ``<image>`` id.
    """

    def __init__(self, resolved: ResolvedStage, mesh: Mesh, image_token_id: int):
        self.grad_accum = resolved.stage.optim.grad_accum
        self.vocab_size = resolved.model.llm.vocab_size
        self.tokens_per_frame = resolved.model.tokens_per_frame
        self.image_token_id = image_token_id
        self.mesh = mesh
        axes = tuple(a for a in resolved.mesh.activation_rules.get("batch", ()) if a in mesh.shape)
        self.batch_axes = axes or None
        self.has_frames = resolved.data.max_frames_per_row > 0

    def _sharding(self, ndim: int) -> NamedSharding:
        # [A, b, ...]: the accumulation axis is stepped through (never sharded), rows go over the
        # batch axes, and everything else (the sequence included) is replicated: dense
        # attention needs every token of a row on the device.
        return NamedSharding(self.mesh, P(None, self.batch_axes, *([None] * (ndim - 2))))

    def host_arrays(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's batch as the numpy arrays ``loss`` reads, reshaped [A, b, ...].

        Raises:
          ValueError: a text id outside the model's vocabulary, or rows that cannot be split
            into ``grad_accum`` micro-batches.
        """
        text_ids, visual_index = expand_packed_rows(
            batch, self.image_token_id, self.tokens_per_frame
        )
        if text_ids.size and int(text_ids.max()) >= self.vocab_size:
            # jnp.take would clamp silently: a tokenizer/model mismatch must fail loudly.
            r, c = np.argwhere(text_ids >= self.vocab_size)[0]
            raise ValueError(
                f"batch row {r}, position {c}: token id {text_ids[r, c]} is outside the model's "
                f"vocabulary ({self.vocab_size}); the data tokenizer does not match the model"
            )
        rows = text_ids.shape[0]
        if rows % self.grad_accum:
            raise ValueError(f"{rows} rows cannot be split into {self.grad_accum} micro-batches")
        micro_rows = rows // self.grad_accum
        out = {
            "text_ids": text_ids,
            "positions": np.asarray(batch["positions"], np.int32),
            "segment_ids": np.asarray(batch["segment_ids"], np.int32),
            "labels": np.asarray(batch["labels"], np.int32),
        }
        if self.has_frames:
            out["visual_index"] = visual_index
            out["frames"] = np.asarray(batch["frames"], np.float32)
        # Consecutive rows form a micro-batch: micro-batch m is rows [m * b, (m + 1) * b).
        return {k: v.reshape(self.grad_accum, micro_rows, *v.shape[1:]) for k, v in out.items()}

    def shardings(self) -> dict[str, NamedSharding]:
        ndims = {"text_ids": 3, "positions": 3, "segment_ids": 3, "labels": 3}
        if self.has_frames:
            ndims.update(visual_index=3, frames=6)
        return {k: self._sharding(n) for k, n in ndims.items()}

    def to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This data shard's rows (``parallel.host_shards``) -> global device arrays."""
        arrays = self.host_arrays(batch)
        shardings = self.shardings()
        shard = data_shard(self.mesh, self.batch_axes or ())
        return {k: shard.global_array(v, shardings[k]) for k, v in arrays.items()}

    def loss(self, model: Any, micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(sum of CE over supervised tokens, their number) of one micro-batch.

        Args:
          model: the LongVILA model.
          micro: one micro-batch of :meth:`host_arrays` (leading axis removed), on device.
        """
        if self.has_frames:
            frames = micro["frames"]  # [b, F, P, P, 3]; empty slots are zero frames
            rows, slots = frames.shape[:2]
            visual = model.encode_frames(frames.reshape(rows * slots, *frames.shape[2:]))
            # One [F * tokens_per_frame, D] set per row: ``expand_packed_rows`` indexed every
            # row's own visual tokens, so rows stay independent under data parallelism.
            visual = visual.reshape(rows, -1, visual.shape[-1])
            x = model.embed(micro["text_ids"], micro["visual_index"], visual)
        else:
            x = model.llm.embed(micro["text_ids"])
        # Packed rows: positions restart at every sample and segment ids keep the samples apart
        # in attention; the labels were shifted by the pipeline, per sample.
        hidden = model.llm.hidden(
            inputs_embeds=x, positions=micro["positions"], segment_ids=micro["segment_ids"]
        )
        return token_ce_sum(model.llm.logits, hidden, micro["labels"])


def image_token_id_of(resolved: ResolvedStage) -> int:
    """The ``<image>`` id of the stage's data tokenizer."""
    data = resolved.data
    path = Path(data.tokenizer_dir)
    path = path if path.is_absolute() else Path(data.root) / path
    token_id = tokens.image_token_id(load_tokenizer(path))
    # load_tokenizer has already refused a tokenizer without a single <image> token.
    check(token_id is not None, "data.tokenizer_dir", f"{path}: the tokenizer has no <image>")
    return token_id


def make_dense_objective(resolved: ResolvedStage, mesh: Mesh) -> DenseObjective:
    """Factory of ``OBJECTIVES["dense"]``."""
    return DenseObjective(resolved, mesh, image_token_id_of(resolved))


class MMSPObjective(MMSPPlan):
    """The trainer's ``Objective`` for sequence-parallel stages (``stage.objective: mmsp``).

    Args:
      resolved: the resolved stage (model, data, mesh configs).
      mesh: the device mesh.
      image_token_id: the data tokenizer's ``<image>`` id.
    """

    def __init__(self, resolved: ResolvedStage, mesh: Mesh, image_token_id: int):
        rules = resolved.mesh.activation_rules
        # The zigzag layout numbers devices ring-major (shard r * U + u), and stage 1 deals the
        # frame slots over the same devices in the same order: a mesh file that shards the
        # sequence or the frames otherwise would put tokens and frames on the wrong devices.
        check(
            tuple(rules.get("seq", ())) == ("ring", "ulysses"),
            "activation_rules.seq",
            f"MM-SP needs the sequence sharded over [ring, ulysses], got {rules.get('seq')}",
        )
        check(
            tuple(rules.get("frames", ("ring", "ulysses"))) == ("ring", "ulysses"),
            "activation_rules.frames",
            f"MM-SP spreads frames over [ring, ulysses] (stage 1), got {rules.get('frames')}",
        )
        super().__init__(
            mesh,
            seq_len=resolved.data.row_length,
            frame_slots=resolved.data.max_frames_per_row,
            tokens_per_frame=resolved.model.tokens_per_frame,
            image_token_id=image_token_id,
            batch_axes=tuple(rules.get("batch", ())),
            grad_accum=resolved.stage.optim.grad_accum,
            # The mesh file picks the ring's block kernels ("auto": Pallas on a GPU, XLA else).
            block_kernel=resolved.mesh.block_kernel,
        )


def make_mmsp_objective(resolved: ResolvedStage, mesh: Mesh) -> MMSPObjective:
    """Factory of ``OBJECTIVES["mmsp"]``."""
    return MMSPObjective(resolved, mesh, image_token_id_of(resolved))


# name -> factory(resolved, mesh); ``StageConfig.objective`` picks one.
OBJECTIVES: dict[str, Callable[[ResolvedStage, Mesh], Objective]] = {
    "dense": make_dense_objective,
    "mmsp": make_mmsp_objective,
}

__all__ = [
    "OBJECTIVES",
    "DenseObjective",
    "MMSPObjective",
    "Objective",
    "image_token_id_of",
    "make_dense_objective",
    "make_mmsp_objective",
]
