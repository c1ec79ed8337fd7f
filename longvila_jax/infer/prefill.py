"""MM-SP prefill: the prompt runs through the LLM in the 2D zigzag layout and fills the KV cache.

Host side (:func:`layout_prompts`): each prompt row is expanded (``<image>`` -> visual slots,
``models.vlm.expand_prompts``), right-padded to a common length T_p that is a multiple of
2 * R * U (times the attention block), and permuted once with the 2D zigzag layout. Only integer
arrays are permuted: the embedding gather of :meth:`LongVILA.embed` then produces the
activations directly in layout order, so no activation is ever permuted.

Device side (:func:`make_prefill`): frames through the vision tower and projector, the splice,
then the decoder layers with the MM-SP attention (``parallel.attention.make_mmsp_attention``:
Ulysses all-to-all + zigzag ring). The layers are the model's own ``DecoderLayer`` modules; the
attention kernel is wrapped so that each layer's post-RoPE K/V (the sequence-sharded tensors the
MM-SP kernel receives) are also returned, and those become the cache shards unchanged
(``cache.cache_from_prefill``). Logits are computed only at requested positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.core.attention import AttentionFn
from longvila_jax.infer.cache import KVCache, SeqMesh, cache_from_prefill
from longvila_jax.models.llm import rope_tables
from longvila_jax.models.vlm import expand_prompts
from longvila_jax.parallel.layouts import apply_layout, inverse_permutation, zigzag_2d_permutation


@dataclasses.dataclass(frozen=True)
class LaidOutPrompts:
    """A batch of expanded prompts in the 2D zigzag layout (host numpy, all [B, T_p] int32).

    Attributes:
      text_ids, visual_index, positions, segment_ids: as ``models.vlm.ExpandedInputs``, permuted
        by ``perm`` (segment id 0 = right padding).
      lengths: [B] expanded length of every row (its first decoded token goes at this position).
      perm: [T_p] the layout (``laid_out = natural[perm]``); ``inv`` its inverse.
    """

    text_ids: np.ndarray
    visual_index: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    lengths: np.ndarray
    perm: np.ndarray
    inv: np.ndarray

    def laid_out_index(self, natural: np.ndarray) -> np.ndarray:
        """Natural positions [B, K] -> their indices in the laid-out sequence [B, K]."""
        return self.inv[np.asarray(natural)]


def padded_length(length: int, seq_mesh: SeqMesh, block_size: int = 1, bucket: int = 64) -> int:
    """Smallest T_p >= length that the MM-SP kernel accepts (multiple of 2*R*U*block_size) and
    that is a multiple of ``bucket`` (so similar prompt lengths share one compilation)."""
    multiple = math.lcm(2 * seq_mesh.num_shards * block_size, bucket)
    return max(multiple, -(-length // multiple) * multiple)


def layout_prompts(
    rows: Sequence[np.ndarray],
    frames_per_row: Sequence[int],
    *,
    image_token_id: int,
    tokens_per_frame: int,
    vocab_size: int,
    seq_mesh: SeqMesh,
    block_size: int = 1,
    bucket: int = 64,
) -> LaidOutPrompts:
    """Expands, pads and lays out a batch of prompts.

    Args:
      rows: B 1-D int token arrays, each with one ``image_token_id`` per frame of that row.
      frames_per_row: frames of each row; the frames of all rows are concatenated in row order.
      image_token_id, tokens_per_frame, vocab_size: from the model config.
      seq_mesh: the mesh (R, U decide the layout).
      block_size, bucket: see :func:`padded_length`.

    Returns:
      :class:`LaidOutPrompts`.

    Raises:
      ValueError: a row's placeholder count differs from its frame count, or a bad token id.
    """
    if len(rows) != len(frames_per_row) or not rows:
        raise ValueError(f"got {len(rows)} prompt rows but {len(frames_per_row)} frame counts")
    expanded = []
    for i, (ids, n) in enumerate(zip(rows, frames_per_row, strict=True)):
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt row {i} must be a non-empty 1-D token array, got {ids.shape}")
        try:
            expanded.append(
                expand_prompts(
                    ids[None],
                    num_frames=int(n),
                    image_token_id=image_token_id,
                    tokens_per_frame=tokens_per_frame,
                    vocab_size=vocab_size,
                )
            )
        except ValueError as e:
            raise ValueError(f"prompt row {i}: {e}") from None
    lengths = np.array([int(row.segment_ids.sum()) for row in expanded], np.int32)
    t_p = padded_length(int(lengths.max()), seq_mesh, block_size, bucket)
    b = len(rows)
    text = np.zeros((b, t_p), np.int32)
    visual = np.full((b, t_p), -1, np.int32)
    segments = np.zeros((b, t_p), np.int32)  # 0 = right padding
    frame_offset = 0  # the frames of all rows form one table, in row order
    for i, (row, n) in enumerate(zip(expanded, frames_per_row, strict=True)):
        t = lengths[i]
        text[i, :t] = row.text_ids[0]
        row_visual = row.visual_index[0]
        visual[i, :t] = np.where(row_visual >= 0, row_visual + frame_offset * tokens_per_frame, -1)
        segments[i, :t] = 1
        frame_offset += int(n)
    positions = np.broadcast_to(np.arange(t_p, dtype=np.int32), (b, t_p))
    perm = zigzag_2d_permutation(t_p, seq_mesh.ring, seq_mesh.ulysses)
    return LaidOutPrompts(
        apply_layout(text, perm),
        apply_layout(visual, perm),
        apply_layout(positions, perm),
        apply_layout(segments, perm),
        lengths,
        perm,
        inverse_permutation(perm),
    )


def run_prefill(
    model,
    text_ids: jax.Array,
    visual_index: jax.Array,
    pixel_values: jax.Array | None,
    positions: jax.Array,
    segment_ids: jax.Array,
    logits_index: jax.Array,
    *,
    attn_fn: AttentionFn,
    seq_mesh: SeqMesh,
    new_slots: int,
) -> tuple[KVCache, jax.Array]:
    """Traceable prefill of a ``LongVILA`` model (call under ``jax.jit``).

    Args:
      model: the ``LongVILA`` module.
      text_ids, visual_index, positions, segment_ids: [B, T_p] int32 laid-out prompt arrays.
      pixel_values: [N, H, W, C] normalised frames of all rows, or None.
      logits_index: [B, K] int32 laid-out indices whose logits are wanted.
      attn_fn: the MM-SP attention (any ``AttentionFn`` for the layout).
      seq_mesh: the mesh; new_slots: spare cache slots per shard for decoded tokens.

    Returns:
      (cache, logits [B, K, vocab] fp32).
    """
    llm_cfg = model.cfg.llm
    visual = None if pixel_values is None else model.encode_frames(pixel_values)
    x = model.embed(text_ids, visual_index, visual).astype(jnp.dtype(model.cfg.compute_dtype))
    cos, sin = rope_tables(
        positions, llm_cfg.dim_per_head, llm_cfg.rope_theta, llm_cfg.rope_position_scale
    )
    kv_sharding = seq_mesh.sharding("batch", "seq", None, None)
    layers_def, layers_state = nnx.split(model.llm.layers)

    def body(x, layer_state):
        layer = nnx.merge(layers_def, layer_state)
        tap = {}

        def tapped(q, k, v, **kw):
            # The same traced values the MM-SP kernel consumes: pinning their sharding keeps
            # the cache shards where the kernel already holds them.
            k = jax.lax.with_sharding_constraint(k, kv_sharding)
            v = jax.lax.with_sharding_constraint(v, kv_sharding)
            tap["kv"] = (k, v)
            return attn_fn(q, k, v, **kw)

        x = layer(x, cos, sin, positions, segment_ids, tapped)
        return x, tap["kv"]

    x, (k, v) = jax.lax.scan(body, x, layers_state)
    hidden = model.llm.norm(x)
    picked = jnp.take_along_axis(hidden, logits_index[..., None].astype(jnp.int32), axis=1)
    logits = model.llm.logits(picked)
    return cache_from_prefill(k, v, positions, segment_ids, seq_mesh, new_slots), logits


def make_prefill(
    graphdef, attn_fn: AttentionFn, seq_mesh: SeqMesh, *, compiler_options: dict | None = None
) -> Callable[..., tuple[KVCache, jax.Array]]:
    """Jitted ``prefill(state, text_ids, visual_index, pixel_values, positions, segment_ids,
    logits_index, new_slots=...) -> (cache, logits)`` for a split ``LongVILA`` (``nnx.split``).

    ``new_slots`` is static; everything else is traced, so one compilation serves every prompt
    of the same padded shape and token budget (teacher-forced scoring, which needs no cache,
    is ``infer.scoring``).
    ``compiler_options`` go to ``jax.jit`` (tests lower XLA's optimisation level).
    """

    def fn(
        state, text_ids, visual_index, pixel_values, positions, segment_ids, logits_index, new_slots
    ):
        model = nnx.merge(graphdef, state)
        return run_prefill(
            model,
            text_ids,
            visual_index,
            pixel_values,
            positions,
            segment_ids,
            logits_index,
            attn_fn=attn_fn,
            seq_mesh=seq_mesh,
            new_slots=new_slots,
        )

    return jax.jit(fn, static_argnames=("new_slots",), compiler_options=compiler_options)


__all__ = ["LaidOutPrompts", "layout_prompts", "make_prefill", "padded_length", "run_prefill"]
