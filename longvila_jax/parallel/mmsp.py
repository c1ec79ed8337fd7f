"""MM-SP in the full VLM: sharded frames -> local vision -> two-hop re-shard -> 2D-attention LLM.

The training objective of sequence-parallel stages (longvila.md §5, parallelism.md §1/§4/§6):

1. Host (:meth:`MMSPPlan.host_arrays`): one layout permutation (``zigzag_2d_permutation``) is
   applied to text ids, positions, segment ids and the globally shifted labels; frames are
   reordered so sequence-parallel device k receives its balanced contiguous share
   (``mmsp_routing``); the two all-to-all routing tables are computed.
2. Device, stage 1 (one ``shard_map``): every device runs the vision tower and projector on its
   own frame slots only (parameters enter replicated, i.e. all-gathered from their FSDP shards).
3. Device, stage 2 (same ``shard_map``): visual tokens reach their layout positions through two
   tiled ``all_to_all`` over (ring, ulysses) with static capacities; a device's largest buffer
   of embedded tokens is its b * L / SP shard plus at most SP**2 tokens of routing slack, never
   the whole sequence (upstream all-reduces it onto every rank). Text tokens are embedded where
   they already are.
4. The LLM runs on the laid-out sequence with ``make_mmsp_attention``; positions, segment ids
   and labels are already in the same order, so every other layer is token-local.
5. Loss (§5.8): a ``shard_map`` computes the CE of the local tokens in chunks (at most
   [b, ce_chunk, V] logits live at once, recomputed in the backward pass) and psums the CE sum
   and the supervised-token count over the batch and sequence axes. ``loss`` returns both sums;
   the train step divides them (global token mean).

``train.objective.MMSPObjective`` adapts the plan to the trainer's ``Objective`` protocol
(``to_device`` / ``shardings`` / ``loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.parallel.attention import make_mmsp_attention
from longvila_jax.parallel.host_shards import DataShard, data_shard
from longvila_jax.parallel.layouts import packed_splice_indices, zigzag_2d_permutation
from longvila_jax.parallel.mmsp_routing import RoutingGeometry, routing_tables

_SEQ_KEYS = ("text_ids", "positions", "segment_ids", "labels")


def _take_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table [N, D] gathered at ``index`` (any shape); -1 gives a zero row."""
    n = table.shape[0]
    ext = jnp.concatenate([table, jnp.zeros((1, table.shape[1]), table.dtype)], axis=0)
    return jnp.take(ext, jnp.where(index < 0, n, index), axis=0)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


class MMSPPlan:
    """Host preparation and traced loss of MM-SP training on one mesh.

    Args:
      mesh: mesh with Auto axes (``parallel.mesh.make_mesh``).
      seq_len: expanded row length L; a multiple of 2 * ring * ulysses.
      frame_slots: frame slots F per row of the data batch (0 for text-only stages).
      tokens_per_frame: visual tokens per frame.
      image_token_id: the data tokenizer's ``<image>`` id.
      batch_axes: mesh axes sharding the rows (the mesh file's ``batch`` activation rule).
      ring_axis, ulysses_axis: the sequence axes (the ``seq`` rule must be (ring, ulysses)).
      grad_accum: micro-batches per global batch (leading axis of every device array).
      ce_chunk: tokens per CE chunk on a device (largest divisor of L / SP not above it).
      kv_chunk: passed to ``make_mmsp_attention``.
      shard: this process's data shard (default: from the mesh, ``host_shards.data_shard``);
        :meth:`host_arrays` and :meth:`to_device` take the shard's rows only.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        seq_len: int,
        frame_slots: int,
        tokens_per_frame: int,
        image_token_id: int,
        batch_axes: Sequence[str] = ("data", "fsdp"),
        ring_axis: str = "ring",
        ulysses_axis: str = "ulysses",
        grad_accum: int = 1,
        ce_chunk: int = 1024,
        kv_chunk: int | None = 512,
        shard: DataShard | None = None,
    ):
        self.mesh = mesh
        self.batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
        self.seq_axes = tuple(a for a in (ring_axis, ulysses_axis) if a in mesh.shape)
        self.ring = int(mesh.shape.get(ring_axis, 1))
        self.ulysses = int(mesh.shape.get(ulysses_axis, 1))
        self.sp = self.ring * self.ulysses
        self.groups = (
            int(np.prod([mesh.shape[a] for a in self.batch_axes])) if self.batch_axes else 1
        )
        self._shard = shard  # resolved on first host-side use (the mesh may be abstract)
        if seq_len % (2 * self.sp):
            raise ValueError(
                f"seq_len {seq_len} must be divisible by 2 * ring * ulysses = {2 * self.sp}"
            )
        self.seq_len, self.frame_slots = seq_len, frame_slots
        self.tpf, self.image_token_id = tokens_per_frame, image_token_id
        self.accum, self.ce_chunk = grad_accum, ce_chunk
        self.perm = zigzag_2d_permutation(seq_len, self.ring, self.ulysses)
        self.attn = make_mmsp_attention(
            mesh,
            ring_axis=ring_axis,
            ulysses_axis=ulysses_axis,
            batch_axes=self.batch_axes,
            kv_chunk=kv_chunk,
        )

    # ----------------------------------------------------------------------------- host side
    @property
    def shard(self) -> DataShard:
        """This process's data shard: which rows :meth:`host_arrays` receives."""
        if self._shard is None:
            self._shard = data_shard(self.mesh, self.batch_axes)
        if self.groups % self._shard.count:
            raise ValueError(f"{self.groups} batch groups cannot form {self._shard.count} shards")
        return self._shard

    def geometry(self, rows: int) -> RoutingGeometry:
        """Shapes of a micro-batch of this shard's ``rows`` (its batch groups only)."""
        groups = self.groups // self.shard.count
        return RoutingGeometry(rows, groups, self.seq_len, self.sp, self.frame_slots, self.tpf)

    def host_arrays(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A data-pipeline batch -> the numpy arrays ``loss`` reads, each [A, ...].

        With several data shards (``host_shards``) the batch is this shard's rows, and the
        result is the shard's part of the global arrays: rows, and send tables of its own batch
        groups (routing never crosses a batch group).

        Args:
          batch: ``data.pipeline`` batch: input_ids / text_to_expanded [B, T], frames
            [B, F, P, P, 3], frame_mask [B, F], segment_ids / positions / labels [B, L]
            (labels already shifted on the natural order).

        Returns:
          text_ids / positions / segment_ids / labels / recv [A, b, L] in layout order; frames
          [A, b, SP * frames_per_device, P, P, 3] in device-slot order; send1 [A, G, SP, SP,
          cap1], send2 [A, G, SP, SP, cap2] (the last four only when F > 0).

        Raises:
          ValueError: shapes that do not match the plan, frames that are not a prefix of the
            row's slots, rows not divisible into micro-batches and batch shards.
        """
        seg = np.asarray(batch["segment_ids"])
        rows, length = seg.shape
        if length != self.seq_len:
            raise ValueError(f"segment_ids: row length {length} != plan seq_len {self.seq_len}")
        if rows % self.accum:
            raise ValueError(f"{rows} rows cannot be split into {self.accum} micro-batches")
        frames = np.asarray(batch["frames"]) if self.frame_slots else None
        if frames is not None and frames.shape[1] != self.frame_slots:
            raise ValueError(f"frames: {frames.shape[1]} slots != plan {self.frame_slots}")
        text_ids, visual = packed_splice_indices(batch, self.image_token_id, self.tpf)
        out: dict[str, list[np.ndarray]] = {}
        b = rows // self.accum
        geo = self.geometry(b)
        for m in range(self.accum):
            sl = slice(m * b, (m + 1) * b)
            arrays = {
                "text_ids": text_ids[sl],
                "positions": np.asarray(batch["positions"])[sl],
                "segment_ids": seg[sl],
                "labels": np.asarray(batch["labels"])[sl],
            }
            arrays = {k: v[:, self.perm].astype(np.int32) for k, v in arrays.items()}
            if frames is not None:
                arrays.update(self._visual_arrays(geo, batch, visual[sl], frames[sl], m * b))
            for k, v in arrays.items():
                out.setdefault(k, []).append(v)
        return {k: np.stack(v) for k, v in out.items()}

    def _visual_arrays(self, geo, batch, visual, frames, row0) -> dict[str, np.ndarray]:
        # ``packed_splice_indices`` indexes every row's own visual tokens (frame j, token t ->
        # j * tpf + t), which is exactly the per-row rank ``routing_tables`` expects; an offset
        # by the row's position in the batch would turn the visual tokens of every row but the
        # first into negative ranks, silently embedded as text.
        b = visual.shape[0]
        rank = np.where(visual >= 0, visual, -1)
        mask = np.asarray(batch["frame_mask"], bool)[row0 : row0 + b]
        n_frames = mask.sum(axis=1)
        for r in range(b):
            if not mask[r, : n_frames[r]].all():
                raise ValueError(f"frame_mask row {row0 + r}: real frames must come first")
        tables = routing_tables(geo, rank, n_frames, self.perm)
        src = tables.pop("frame_src")
        laid = np.where(
            (src >= 0)[:, :, None, None, None],
            np.take_along_axis(frames, np.maximum(src, 0)[:, :, None, None, None], axis=1),
            0.0,
        ).astype(np.float32)
        return {"frames": laid, **tables}

    def shardings(self) -> dict[str, NamedSharding]:
        """Sharding of every array of :meth:`host_arrays` (leading accumulation axis)."""
        b, s = self.batch_axes or None, self.seq_axes or None
        sh = {k: P(None, b, s) for k in _SEQ_KEYS}
        if self.frame_slots:
            sh.update(
                recv=P(None, b, s),
                frames=P(None, b, s, None, None, None),
                send1=P(None, b, s, None, None),
                send2=P(None, b, s, None, None),
            )
        return {k: NamedSharding(self.mesh, v) for k, v in sh.items()}

    def to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This shard's host batch -> global device arrays.

        Every process of a shard holds the shard's whole rows (all processes of a
        sequence-parallel group read the same rows); each supplies the (row, sequence) blocks
        of its own devices (``DataShard.global_array``). One process: ``device_put``.
        """
        arrays = self.host_arrays(batch)
        sh = self.shardings()
        return {k: self.shard.global_array(v, sh[k]) for k, v in arrays.items()}

    # --------------------------------------------------------------------------- device side
    def _spec(self, *rest) -> P:
        return P(self.batch_axes or None, self.seq_axes or None, *rest)

    def embed(self, model: Any, micro: Mapping[str, jax.Array]) -> jax.Array:
        """Input embeddings [b, L, D] in layout order, sharded over (batch, seq)."""
        x = model.llm.embed(micro["text_ids"])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self._spec(None)))
        if not self.frame_slots:
            return x
        vis = self.visual_tokens(model, micro)
        return jnp.where((micro["recv"] >= 0)[..., None], vis.astype(x.dtype), x)

    def visual_tokens(self, model: Any, micro: Mapping[str, jax.Array]) -> jax.Array:
        """Stages 1 and 2: [b, L, D] visual tokens at their layout positions (0 at text)."""
        vg, vstate = nnx.split(model.vision)
        pg, pstate = nnx.split(model.projector)
        seq = self.seq_axes

        def body(vstate, pstate, frames, send1, send2, recv):
            vision, projector = nnx.merge(vg, vstate), nnx.merge(pg, pstate)
            b, s = frames.shape[:2]
            tok = projector(vision(frames.reshape(b * s, *frames.shape[2:])))
            tok = tok.reshape(-1, tok.shape[-1])
            hop1 = _take_rows(tok, send1[0, 0])  # [SP intermediates, cap1, D]
            if seq:
                hop1 = jax.lax.all_to_all(hop1, seq, 0, 0, tiled=True)
            hop2 = _take_rows(hop1.reshape(-1, hop1.shape[-1]), send2[0, 0])  # [SP dests, ...]
            if seq:
                hop2 = jax.lax.all_to_all(hop2, seq, 0, 0, tiled=True)
            return _take_rows(hop2.reshape(-1, hop2.shape[-1]), recv)

        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(
                P(),
                P(),
                self._spec(None, None, None),
                self._spec(None, None),
                self._spec(None, None),
                self._spec(),
            ),
            out_specs=self._spec(None),
        )(vstate, pstate, micro["frames"], micro["send1"], micro["send2"], micro["recv"])

    def ce_sums(self, model: Any, hidden: jax.Array, labels: jax.Array):
        """(psum of CE over supervised tokens, psum of their count), fp32 scalars.

        Args:
          model: the LongVILA model (its LM head is used).
          hidden: [b, L, D] final hidden states in layout order; labels: [b, L] int32.
        """
        llm = model.llm
        tied = llm.lm_head is None
        hg, hstate = nnx.split(llm.embed_tokens if tied else llm.lm_head)
        axes = self.batch_axes + self.seq_axes
        chunk = _largest_divisor(self.seq_len // self.sp, self.ce_chunk)

        def body(hstate, h, lab):
            b, n, d = h.shape
            hs = h.reshape(b, n // chunk, chunk, d).swapaxes(0, 1)
            ls = lab.reshape(b, n // chunk, chunk).swapaxes(0, 1)

            @jax.checkpoint
            def one(hstate, hc, lc):
                head = nnx.merge(hg, hstate)
                logits = (head.attend(hc) if tied else head(hc)).astype(jnp.float32)
                mask = lc >= 0
                tgt = jnp.where(mask, lc, 0)
                lse = jax.nn.logsumexp(logits, axis=-1)
                picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
                return jnp.where(mask, lse - picked, 0.0).sum(), mask.sum().astype(jnp.float32)

            # Per-chunk sums come out as scan outputs (no carry: its varying axes would differ).
            _, (ce, cnt) = jax.lax.scan(lambda c, xs: (c, one(hstate, *xs)), None, (hs, ls))
            ce, cnt = ce.sum(), cnt.sum()
            if axes:
                ce, cnt = jax.lax.psum(ce, axes), jax.lax.psum(cnt, axes)
            return ce, cnt

        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(P(), self._spec(None), self._spec()),
            out_specs=(P(), P()),
        )(hstate, hidden, labels)

    def loss(self, model: Any, micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(sum of CE over supervised tokens, their number) of one micro-batch, all devices.

        Args:
          model: the LongVILA model (parameters may be FSDP-sharded global arrays).
          micro: one micro-batch of :meth:`host_arrays` (leading axis removed), on device.
        """
        x = self.embed(model, micro)
        h = model.llm.hidden(
            inputs_embeds=x,
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            attn_fn=self.attn,
        )
        return self.ce_sums(model, h, micro["labels"])


__all__ = ["MMSPPlan"]
