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
5. Loss (§5.8): a ``shard_map`` computes the CE of the local tokens in chunks with the shared
   ``core.loss.token_ce_sum`` (at most [b, ce_chunk, V] logits live at once, recomputed in the
   backward pass) and psums the CE sum and the supervised-token count over the batch and
   sequence axes. ``loss`` returns both sums; the train step divides them (global token mean).

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

from longvila_jax.core.loss import token_ce_sum
from longvila_jax.parallel.attention import make_mmsp_attention
from longvila_jax.parallel.host_shards import DataShard, data_shard
from longvila_jax.parallel.layouts import expand_packed_rows, layout_batch, zigzag_2d_permutation
from longvila_jax.parallel.mmsp_routing import RoutingGeometry, routing_tables

# Per-token fields: permuted into the layout on the host, sharded like the sequence on device.
_SEQ_KEYS = ("text_ids", "positions", "segment_ids", "labels")


def _take_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table [N, D] gathered at ``index`` (any shape); -1 gives a zero row.

    The routing tables mark unused buffer slots with -1; an appended zero row makes them cost
    a gather of zeros instead of a mask.
    """
    rows = table.shape[0]
    padded = jnp.concatenate([table, jnp.zeros((1, table.shape[1]), table.dtype)], axis=0)
    return jnp.take(padded, jnp.where(index < 0, rows, index), axis=0)


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (at least 1): CE chunks must tile a
    device's tokens exactly, since ``lax.scan`` needs equal chunks."""
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
      kv_chunk, block_kernel: passed to ``make_mmsp_attention`` (``block_kernel`` is the mesh
        file's ``MeshConfig.block_kernel``: "auto", "xla" or "pallas").
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
        block_kernel: str = "auto",
        shard: DataShard | None = None,
    ):
        self.mesh = mesh
        self.batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
        self.seq_axes = tuple(a for a in (ring_axis, ulysses_axis) if a in mesh.shape)
        self.ring = int(mesh.shape.get(ring_axis, 1))
        self.ulysses = int(mesh.shape.get(ulysses_axis, 1))
        self.sp = self.ring * self.ulysses
        self.batch_groups = (
            int(np.prod([mesh.shape[a] for a in self.batch_axes])) if self.batch_axes else 1
        )
        self._shard = shard  # resolved on first host-side use (the mesh may be abstract)
        if seq_len % (2 * self.sp):
            raise ValueError(
                f"seq_len {seq_len} must be divisible by 2 * ring * ulysses = {2 * self.sp}"
            )
        self.seq_len, self.frame_slots = seq_len, frame_slots
        self.tokens_per_frame, self.image_token_id = tokens_per_frame, image_token_id
        self.grad_accum, self.ce_chunk = grad_accum, ce_chunk
        self.perm = zigzag_2d_permutation(seq_len, self.ring, self.ulysses)
        self.attention_fn = make_mmsp_attention(
            mesh,
            ring_axis=ring_axis,
            ulysses_axis=ulysses_axis,
            batch_axes=self.batch_axes,
            kv_chunk=kv_chunk,
            block_kernel=block_kernel,
        )

    # ----------------------------------------------------------------------------- host side
    @property
    def shard(self) -> DataShard:
        """This process's data shard: which rows :meth:`host_arrays` receives."""
        if self._shard is None:
            self._shard = data_shard(self.mesh, self.batch_axes)
        if self.batch_groups % self._shard.count:
            raise ValueError(
                f"{self.batch_groups} batch groups cannot form {self._shard.count} shards"
            )
        return self._shard

    def geometry(self, rows: int) -> RoutingGeometry:
        """Shapes of a micro-batch of this shard's ``rows`` (its batch groups only)."""
        groups = self.batch_groups // self.shard.count
        return RoutingGeometry(
            rows, groups, self.seq_len, self.sp, self.frame_slots, self.tokens_per_frame
        )

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
          hop1_capacity], send2 [A, G, SP, SP, hop2_capacity] (the last four only when F > 0).

        Raises:
          ValueError: shapes that do not match the plan, frames that are not a prefix of the
            row's slots, rows not divisible into micro-batches and batch shards.
        """
        segment_ids = np.asarray(batch["segment_ids"])
        rows, length = segment_ids.shape
        if length != self.seq_len:
            raise ValueError(f"segment_ids: row length {length} != plan seq_len {self.seq_len}")
        if rows % self.grad_accum:
            raise ValueError(f"{rows} rows cannot be split into {self.grad_accum} micro-batches")
        frames = np.asarray(batch["frames"]) if self.frame_slots else None
        if frames is not None and frames.shape[1] != self.frame_slots:
            raise ValueError(f"frames: {frames.shape[1]} slots != plan {self.frame_slots}")
        text_ids, visual_index = expand_packed_rows(
            batch, self.image_token_id, self.tokens_per_frame
        )
        out: dict[str, list[np.ndarray]] = {}
        micro_rows = rows // self.grad_accum
        geometry = self.geometry(micro_rows)
        for m in range(self.grad_accum):
            first_row = m * micro_rows
            micro = slice(first_row, first_row + micro_rows)
            natural = {
                "text_ids": text_ids[micro],
                "positions": np.asarray(batch["positions"])[micro],
                "segment_ids": segment_ids[micro],
                "labels": np.asarray(batch["labels"])[micro],
            }
            # One permutation for every per-token field. The labels were shifted on the natural
            # order (by the pipeline), so each token keeps its own next-token target wherever
            # the layout puts it; the kernels read the causal order from the positions.
            laid_out = layout_batch(natural, self.perm, _SEQ_KEYS)
            arrays = {k: v.astype(np.int32) for k, v in laid_out.items()}
            if frames is not None:
                arrays.update(
                    self._visual_arrays(
                        geometry, batch, visual_index[micro], frames[micro], first_row
                    )
                )
            for k, v in arrays.items():
                out.setdefault(k, []).append(v)
        return {k: np.stack(v) for k, v in out.items()}

    def _visual_arrays(
        self,
        geometry: RoutingGeometry,
        batch: Mapping[str, np.ndarray],
        visual_index: np.ndarray,
        frames: np.ndarray,
        first_row: int,
    ) -> dict[str, np.ndarray]:
        """Frames in device-slot order and the routing tables of one micro-batch's rows.

        ``visual_index`` [b, L] (natural order) indexes every row's own visual tokens (frame j,
        token t -> j * tokens_per_frame + t, ``expand_packed_rows``), which is exactly the
        per-row rank ``routing_tables`` expects; an offset by the row's position in the batch
        would turn the visual tokens of every row but the first into negative ranks, silently
        embedded as text.
        """
        rows = visual_index.shape[0]
        frame_mask = np.asarray(batch["frame_mask"], bool)[first_row : first_row + rows]
        n_frames = frame_mask.sum(axis=1)
        # Frame ownership counts frames 0 .. n-1 of a row: real frames must come first.
        for r in range(rows):
            if not frame_mask[r, : n_frames[r]].all():
                raise ValueError(f"frame_mask row {first_row + r}: real frames must come first")
        tables = routing_tables(geometry, visual_index, n_frames, self.perm)
        frame_src = tables.pop("frame_src")
        # Reorder the frames so that sharding the slot axis over the SP devices hands every
        # device the frames it owns (stage 1); empty slots become zero frames.
        source_frame = np.maximum(frame_src, 0)[:, :, None, None, None]
        frames_by_slot = np.where(
            (frame_src >= 0)[:, :, None, None, None],
            np.take_along_axis(frames, source_frame, axis=1),
            0.0,
        ).astype(np.float32)
        return {"frames": frames_by_slot, **tables}

    def shardings(self) -> dict[str, NamedSharding]:
        """Sharding of every array of :meth:`host_arrays` (leading accumulation axis)."""
        rows, seq = self.batch_axes or None, self.seq_axes or None
        specs = {k: P(None, rows, seq) for k in _SEQ_KEYS}
        if self.frame_slots:
            # The frame slots and the tables' source / intermediate axis are sharded like the
            # sequence: device k of an SP group receives exactly its own part of each.
            specs.update(
                recv=P(None, rows, seq),
                frames=P(None, rows, seq, None, None, None),
                send1=P(None, rows, seq, None, None),
                send2=P(None, rows, seq, None, None),
            )
        return {k: NamedSharding(self.mesh, v) for k, v in specs.items()}

    def to_device(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This shard's host batch -> global device arrays.

        Every process of a shard holds the shard's whole rows (all processes of a
        sequence-parallel group read the same rows); each supplies the (row, sequence) blocks
        of its own devices (``DataShard.global_array``). One process: ``device_put``.
        """
        arrays = self.host_arrays(batch)
        shardings = self.shardings()
        return {k: self.shard.global_array(v, shardings[k]) for k, v in arrays.items()}

    # --------------------------------------------------------------------------- device side
    def _spec(self, *rest) -> P:
        """P(batch axes, sequence axes, *rest): rows over the batch, axis 1 over the SP group."""
        return P(self.batch_axes or None, self.seq_axes or None, *rest)

    def embed(self, model: Any, micro: Mapping[str, jax.Array]) -> jax.Array:
        """Input embeddings [b, L, D] in layout order, sharded over (batch, seq)."""
        # Text ids are 0 at visual positions (``expand_packed_rows``), so the lookup never sees
        # a media id; those rows are replaced below.
        x = model.llm.embed(micro["text_ids"])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self._spec(None)))
        if not self.frame_slots:
            return x
        visual = self.visual_tokens(model, micro)
        return jnp.where((micro["recv"] >= 0)[..., None], visual.astype(x.dtype), x)

    def visual_tokens(self, model: Any, micro: Mapping[str, jax.Array]) -> jax.Array:
        """Stages 1 and 2: [b, L, D] visual tokens at their layout positions (0 at text)."""
        vision_def, vision_state = nnx.split(model.vision)
        projector_def, projector_state = nnx.split(model.projector)
        seq_axes = self.seq_axes

        # Every ``*_local`` array is this device's block: frames_local [b, frames_per_device,
        # P, P, 3]; send1_local [1, 1, SP, hop1_capacity] and send2_local [1, 1, SP,
        # hop2_capacity] (its batch group's, its own source / intermediate row); recv_local
        # [b, L / SP].
        def body(vision_state, projector_state, frames_local, send1_local, send2_local, recv_local):
            # The parameters enter replicated (all-gathered from their FSDP shards).
            vision = nnx.merge(vision_def, vision_state)
            projector = nnx.merge(projector_def, projector_state)
            rows, slots = frames_local.shape[:2]
            # Stage 1: encode only this device's frames.
            tokens_local = projector(
                vision(frames_local.reshape(rows * slots, *frames_local.shape[2:]))
            )
            # [b * frames_per_device * tokens_per_frame, D]: the order send1's indices use.
            tokens_local = tokens_local.reshape(-1, tokens_local.shape[-1])
            # Stage 2, hop 1: fill one fixed-size buffer per intermediate and exchange them; a
            # tiled all_to_all over the SP group swaps the leading axis, so afterwards row i of
            # the buffer holds what source i sent to this device.
            hop1_local = _take_rows(tokens_local, send1_local[0, 0])  # [SP, hop1_capacity, D]
            if seq_axes:
                hop1_local = jax.lax.all_to_all(hop1_local, seq_axes, 0, 0, tiled=True)
            # Hop 2: forward from the flattened receive buffer to every destination.
            hop2_local = _take_rows(hop1_local.reshape(-1, hop1_local.shape[-1]), send2_local[0, 0])
            if seq_axes:
                hop2_local = jax.lax.all_to_all(hop2_local, seq_axes, 0, 0, tiled=True)
            # Every visual slot of this device's [b, L / SP] block reads its token (text: 0).
            return _take_rows(hop2_local.reshape(-1, hop2_local.shape[-1]), recv_local)

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
        )(
            vision_state,
            projector_state,
            micro["frames"],
            micro["send1"],
            micro["send2"],
            micro["recv"],
        )

    def ce_sums(
        self, model: Any, hidden: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(psum of CE over supervised tokens, psum of their count), fp32 scalars.

        Args:
          model: the LongVILA model (its LM head is used).
          hidden: [b, L, D] final hidden states in layout order; labels: [b, L] int32.
        """
        llm = model.llm
        tied = llm.lm_head is None
        head_def, head_state = nnx.split(llm.embed_tokens if tied else llm.lm_head)
        reduce_axes = self.batch_axes + self.seq_axes
        chunk_len = _largest_divisor(self.seq_len // self.sp, self.ce_chunk)

        # hidden_local [b, L / SP, D] and labels_local [b, L / SP]: this device's tokens.
        def body(head_state, hidden_local, labels_local):
            rows, n_local, width = hidden_local.shape
            n_chunks = n_local // chunk_len
            hidden_chunks = hidden_local.reshape(rows, n_chunks, chunk_len, width).swapaxes(0, 1)
            labels_chunks = labels_local.reshape(rows, n_chunks, chunk_len).swapaxes(0, 1)

            # Remat: only one chunk's [b, chunk_len, V] logits live at a time, in the backward
            # pass too (they are recomputed from the chunk's hidden states).
            @jax.checkpoint
            def chunk_ce(head_state, hidden_chunk, labels_chunk):
                head = nnx.merge(head_def, head_state)
                return token_ce_sum(head.attend if tied else head, hidden_chunk, labels_chunk)

            # Per-chunk sums come out as scan outputs (no carry: its varying axes would differ).
            _, (ce_per_chunk, count_per_chunk) = jax.lax.scan(
                lambda carry, xs: (carry, chunk_ce(head_state, *xs)),
                None,
                (hidden_chunks, labels_chunks),
            )
            ce, count = ce_per_chunk.sum(), count_per_chunk.sum()
            # Sums over every device: the loss is the global token mean (train step divides).
            if reduce_axes:
                ce, count = jax.lax.psum(ce, reduce_axes), jax.lax.psum(count, reduce_axes)
            return ce, count

        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(P(), self._spec(None), self._spec()),
            out_specs=(P(), P()),
        )(head_state, hidden, labels)

    def loss(self, model: Any, micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(sum of CE over supervised tokens, their number) of one micro-batch, all devices.

        Args:
          model: the LongVILA model (parameters may be FSDP-sharded global arrays).
          micro: one micro-batch of :meth:`host_arrays` (leading axis removed), on device.
        """
        x = self.embed(model, micro)
        # Positions and segment ids are in the same layout order as the tokens, so every layer
        # but attention is token-local and attention reads the causal order from them.
        hidden = model.llm.hidden(
            inputs_embeds=x,
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            attn_fn=self.attention_fn,
        )
        return self.ce_sums(model, hidden, micro["labels"])


__all__ = ["MMSPPlan"]
