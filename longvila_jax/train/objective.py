"""The training objective: how a host batch becomes device arrays, and the loss of one micro-batch.

The loop and the jitted step only talk to an :class:`Objective`, so sequence parallelism can
replace this whole piece (frames sharded over the SP devices, tokens moved into the 2D zigzag
layout) without touching the loop. This module holds the plain one: dense attention, the batch
sharded over the mesh's batch axes and replicated over the sequence axes.

Contract of ``Objective.loss``: it returns the *sum* of token cross-entropies and the *number*
of supervised tokens of one micro-batch; the step divides the sums over all micro-batches (and,
through GSPMD, all devices), giving the global token mean of issue 5.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.config.base import check
from longvila_jax.data.text import image_token_id, load_tokenizer
from longvila_jax.parallel.host_shards import data_shard
from longvila_jax.parallel.layouts import packed_splice_indices
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
        self.accum = resolved.stage.optim.grad_accum
        self.vocab_size = resolved.model.llm.vocab_size
        self.tpf = resolved.model.tokens_per_frame
        self.image_token_id = image_token_id
        self.mesh = mesh
        axes = tuple(a for a in resolved.mesh.activation_rules.get("batch", ()) if a in mesh.shape)
        self.batch_axes = axes or None
        self.has_frames = resolved.data.max_frames_per_row > 0

    def _sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, self.batch_axes, *([None] * (ndim - 2))))

    def host_arrays(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's batch as the numpy arrays ``loss`` reads, reshaped [A, b, ...]."""
        text_ids, visual = packed_splice_indices(batch, self.image_token_id, self.tpf)
        if text_ids.size and int(text_ids.max()) >= self.vocab_size:
            # jnp.take would clamp silently: a tokenizer/model mismatch must fail loudly.
            r, c = np.argwhere(text_ids >= self.vocab_size)[0]
            raise ValueError(
                f"batch row {r}, position {c}: token id {text_ids[r, c]} is outside the model's "
                f"vocabulary ({self.vocab_size}); the data tokenizer does not match the model"
            )
        rows = text_ids.shape[0]
        if rows % self.accum:
            raise ValueError(f"{rows} rows cannot be split into {self.accum} micro-batches")
        b = rows // self.accum
        out = {
            "text_ids": text_ids,
            "positions": np.asarray(batch["positions"], np.int32),
            "segment_ids": np.asarray(batch["segment_ids"], np.int32),
            "labels": np.asarray(batch["labels"], np.int32),
        }
        if self.has_frames:
            out["visual_index"] = visual
            out["frames"] = np.asarray(batch["frames"], np.float32)
        return {k: v.reshape(self.accum, b, *v.shape[1:]) for k, v in out.items()}

    def shardings(self) -> dict[str, NamedSharding]:
        nd = {"text_ids": 3, "positions": 3, "segment_ids": 3, "labels": 3}
        if self.has_frames:
            nd.update(visual_index=3, frames=6)
        return {k: self._sharding(n) for k, n in nd.items()}

    def to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This data shard's rows (``parallel.host_shards``) -> global device arrays."""
        arrays = self.host_arrays(batch)
        sh = self.shardings()
        shard = data_shard(self.mesh, self.batch_axes or ())
        return {k: shard.global_array(v, sh[k]) for k, v in arrays.items()}

    def loss(self, model: Any, micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        text_ids = micro["text_ids"]
        if self.has_frames:
            fr = micro["frames"]  # [b, F, P, P, 3]
            b, n = fr.shape[:2]
            visual = model.encode_frames(fr.reshape(b * n, *fr.shape[2:]))
            visual = visual.reshape(b, -1, visual.shape[-1])  # [b, F * tpf, D], per row
            idx = micro["visual_index"]
            is_visual = idx >= 0
            # Visual slots are never looked up in the table: media ids may exceed it.
            x = model.llm.embed(jnp.where(is_visual, 0, text_ids))
            v = jnp.take_along_axis(visual, jnp.maximum(idx, 0)[..., None], axis=1)
            x = jnp.where(is_visual[..., None], v.astype(x.dtype), x)
        else:
            x = model.llm.embed(text_ids)
        h = model.llm.hidden(
            inputs_embeds=x, positions=micro["positions"], segment_ids=micro["segment_ids"]
        )
        return token_ce_sum(model.llm.logits, h, micro["labels"])


def token_ce_sum(
    logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of CE over tokens with ``labels >= 0`` and their count.

    Args:
      logits_fn: [..., D] -> [..., V] fp32 logits.
      hidden: [B, L, D] final hidden states.
      labels: [B, L] int32 targets (already shifted), ``IGNORE_INDEX`` where none.

    Returns:
      (ce_sum fp32 [], n_tokens fp32 []).
    """
    logits = logits_fn(hidden)
    mask = labels >= 0
    tgt = jnp.where(mask, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    ce = jnp.where(mask, lse - picked, 0.0)
    return ce.sum(), mask.sum().astype(jnp.float32)


def image_token_id_of(resolved: ResolvedStage) -> int:
    """The ``<image>`` id of the stage's data tokenizer."""
    d = resolved.data
    tok = Path(d.tokenizer_dir)
    tok = tok if tok.is_absolute() else Path(d.root) / tok
    return image_token_id(load_tokenizer(tok))


def make_dense_objective(resolved: ResolvedStage, mesh: Mesh) -> DenseObjective:
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
    "Objective",
    "MMSPObjective",
    "make_mmsp_objective",
    "image_token_id_of",
    "make_dense_objective",
    "token_ce_sum",
]
