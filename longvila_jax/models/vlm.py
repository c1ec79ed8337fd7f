"""The LongVILA VLM: SigLIP tower -> projector -> visual tokens spliced into the LLM sequence.

Port of VILA's ``llava/model/llava_arch.py::_embed`` splice: every ``<image>`` placeholder id in
the prompt is replaced by its frame's ``tokens_per_frame`` projector outputs. The ``\\n`` after
each frame is an ordinary text token already in the prompt (longvila.md §3.4: 197 positions per
frame). Frames are matched to placeholders in row-major order over (batch row, position).

The splice is split in two so it stays jit-friendly and reusable by sequence parallelism:

- host side (numpy, static shapes), the *splice indices*: for each position of the expanded
  sequence, the text token id and the index of the visual token that goes there (-1 for text).
  :func:`expand_prompts` computes them for unpacked prompts (inference, evaluation: one sample
  per row, visual indices over the whole batch); ``parallel.layouts.expand_packed_rows`` for the
  data pipeline's packed rows (training: visual indices per row);
- device side, the *splice* itself, once for every caller: :meth:`LongVILA.embed` gathers the
  text embeddings and the visual tokens and selects with ``jnp.where``. Media ids are never
  looked up in the embedding table (they may exceed the vocabulary).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.config.model import ModelConfig
from longvila_jax.core.attention import AttentionFn, dense_attention
from longvila_jax.models.llm import LLM
from longvila_jax.models.projector import Projector
from longvila_jax.models.vision import VisionTower


@dataclass(frozen=True)
class ExpandedInputs:
    """Host-side description of the expanded sequence; every array is [B, T_exp].

    Attributes:
      text_ids: int32 text token ids; 0 where the position holds a visual token.
      visual_index: int32 index into the flat [num_frames * tokens_per_frame] visual tokens,
        -1 for text positions.
      positions: int32 default positions (``arange`` per row).
      segment_ids: int32, 1 for real tokens, 0 for right padding of shorter rows.
    """

    text_ids: np.ndarray
    visual_index: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray


def expand_prompts(
    input_ids: np.ndarray,
    *,
    num_frames: int,
    image_token_id: int,
    tokens_per_frame: int,
    vocab_size: int,
    pad_to: int | None = None,
) -> ExpandedInputs:
    """Splice indices of unpacked prompts: each placeholder becomes ``tokens_per_frame``
    visual slots (host side, numpy).

    Frames are numbered in row-major order over (batch row, position), so the visual indices
    run over the whole batch's [num_frames * tokens_per_frame] tokens (unlike the per-row
    indices of ``parallel.layouts.expand_packed_rows``).

    Args:
      input_ids: [B, T] int token ids with ``image_token_id`` placeholders, one per frame.
      num_frames: number of frames supplied; must equal the number of placeholders.
      image_token_id: the placeholder id.
      tokens_per_frame: visual tokens per frame.
      vocab_size: LLM vocabulary size; every other id must lie in [0, vocab_size).
      pad_to: expanded length; default the longest expanded row. Shorter rows are right-padded
        with segment id 0.

    Returns:
      :class:`ExpandedInputs` of shape [B, T_exp].

    Raises:
      ValueError: placeholder/frame count mismatch, out-of-vocabulary text ids, bad shapes.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"input_ids must be an integer [batch, seq] array, got {ids.dtype} {ids.shape}"
        )
    is_media = ids == image_token_id
    n_placeholders = int(is_media.sum())
    if n_placeholders != num_frames:
        raise ValueError(
            f"input_ids contain {n_placeholders} image placeholders (id {image_token_id}) but "
            f"{num_frames} frames were given; each placeholder needs exactly one frame"
        )
    bad = (~is_media) & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"input_ids[{row}, {col}] = {ids[row, col]} is outside the vocabulary "
            f"[0, {vocab_size}) and is not the image placeholder {image_token_id}"
        )
    b = ids.shape[0]
    # Expanded length of every input token: tokens_per_frame for a placeholder, else 1.
    widths = np.where(is_media, tokens_per_frame, 1)
    lengths = widths.sum(axis=1)
    expanded_len = int(lengths.max()) if b else 0
    if pad_to is not None:
        if pad_to < expanded_len:
            raise ValueError(f"pad_to={pad_to} is shorter than the expanded length {expanded_len}")
        expanded_len = pad_to
    text_ids = np.zeros((b, expanded_len), np.int32)
    visual_index = np.full((b, expanded_len), -1, np.int32)
    segment_ids = np.zeros((b, expanded_len), np.int32)
    starts = np.cumsum(widths, axis=1) - widths  # expanded start of every input token
    frame = np.cumsum(is_media.reshape(-1)).reshape(ids.shape) - 1  # frame id of a placeholder
    offsets = np.arange(tokens_per_frame, dtype=np.int32)
    for r in range(b):
        text = ~is_media[r]
        text_ids[r, starts[r, text]] = ids[r, text]
        media_cols = np.flatnonzero(is_media[r])
        if media_cols.size:
            slots = (starts[r, media_cols][:, None] + offsets).reshape(-1)
            visual_index[r, slots] = (
                frame[r, media_cols][:, None] * tokens_per_frame + offsets
            ).reshape(-1)
        segment_ids[r, : lengths[r]] = 1
    positions = np.broadcast_to(np.arange(expanded_len, dtype=np.int32), (b, expanded_len)).copy()
    return ExpandedInputs(text_ids, visual_index, positions, segment_ids)


@functools.partial(nnx.jit, static_argnames=("attn_fn",))
def _forward_expanded_jit(
    model, text_ids, visual_index, pixel_values, positions, segment_ids, attn_fn
):
    return model.forward_expanded(
        text_ids, visual_index, pixel_values, positions, segment_ids, attn_fn=attn_fn
    )


class LongVILA(nnx.Module):
    """SigLIP tower + projector + LLM.

    Args:
      cfg: model config.
      rngs: parameter initialisation keys.
      attn_fn: default LLM attention kernel (the vision tower always uses dense attention over
        its frame-local patches); every call may override it.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attn_fn: AttentionFn = dense_attention):
        self.cfg = cfg
        self.vision = VisionTower(cfg, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.llm = LLM(cfg, rngs=rngs, attn_fn=attn_fn)

    def encode_frames(self, pixel_values: jax.Array) -> jax.Array:
        """[N, H, W, C] normalised frames -> flat visual tokens [N * tokens_per_frame, D]."""
        tokens = self.projector(self.vision(pixel_values))
        return tokens.reshape(-1, tokens.shape[-1])

    def embed(
        self, text_ids: jax.Array, visual_index: jax.Array, visual_tokens: jax.Array | None
    ) -> jax.Array:
        """Input embeddings of the expanded sequence: the visual-token splice (jit-friendly).

        Args:
          text_ids: [B, T] int32 text ids (values at visual positions are ignored).
          visual_index: [B, T] int32 index into ``visual_tokens``, -1 for text.
          visual_tokens: the visual tokens, either [M, D] shared by the batch (the indices of
            :func:`expand_prompts` run over every row's frames) or [B, M, D] one set per row
            (the per-row indices of ``parallel.layouts.expand_packed_rows``); None when there
            are no frames.

        Returns:
          [B, T, D] in compute dtype.
        """
        is_visual = visual_index >= 0
        # Visual positions are never looked up in the table: their ids may exceed it.
        x = self.llm.embed(jnp.where(is_visual, 0, text_ids))
        if visual_tokens is None:
            return x
        index = jnp.maximum(visual_index, 0)  # text positions gather token 0, discarded below
        if visual_tokens.ndim == 2:
            v = jnp.take(visual_tokens, index, axis=0)
        else:
            v = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)
        return jnp.where(is_visual[..., None], v.astype(x.dtype), x)

    def forward_expanded(
        self,
        text_ids: jax.Array,
        visual_index: jax.Array,
        pixel_values: jax.Array | None,
        positions: jax.Array,
        segment_ids: jax.Array,
        *,
        attn_fn: AttentionFn | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (fp32) of an already expanded sequence (all [B, T] int32 inputs)."""
        visual = None if pixel_values is None else self.encode_frames(pixel_values)
        x = self.embed(text_ids, visual_index, visual)
        return self.llm(
            inputs_embeds=x, positions=positions, segment_ids=segment_ids, attn_fn=attn_fn
        )

    def __call__(
        self,
        input_ids: np.ndarray,
        pixel_values: jax.Array | None,
        *,
        positions: np.ndarray | None = None,
        segment_ids: np.ndarray | None = None,
        attn_fn: AttentionFn | None = None,
    ) -> jax.Array:
        """Logits for every position of the expanded sequence.

        Expands the placeholders on the host, then runs :meth:`forward_expanded` under
        ``nnx.jit`` (one compilation per input shape and attention kernel).

        Args:
          input_ids: [B, T] host (numpy) token ids with one ``cfg.image_token_id`` per frame.
          pixel_values: [N, H, W, C] normalised frames in placeholder order (row-major over
            (batch, position)); None or N = 0 when there are no placeholders.
          positions: optional [B, T_exp] positions of the expanded sequence (default arange).
          segment_ids: optional [B, T_exp] segment ids (default 1, 0 on right padding).
          attn_fn: overrides the LLM attention kernel.

        Returns:
          [B, T_exp, vocab_size] fp32 logits.
        """
        n_frames = 0 if pixel_values is None else int(pixel_values.shape[0])
        expanded = expand_prompts(
            np.asarray(input_ids),
            num_frames=n_frames,
            image_token_id=self.cfg.image_token_id,
            tokens_per_frame=self.cfg.tokens_per_frame,
            vocab_size=self.cfg.llm.vocab_size,
        )
        shape = expanded.text_ids.shape
        for name, given in (("positions", positions), ("segment_ids", segment_ids)):
            if given is not None and tuple(np.shape(given)) != shape:
                raise ValueError(
                    f"{name} must have the expanded shape {shape}, got {tuple(np.shape(given))}"
                )
        positions = expanded.positions if positions is None else positions
        segment_ids = expanded.segment_ids if segment_ids is None else segment_ids
        return _forward_expanded_jit(
            self,
            jnp.asarray(expanded.text_ids),
            jnp.asarray(expanded.visual_index),
            None if n_frames == 0 else jnp.asarray(pixel_values),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(segment_ids, jnp.int32),
            attn_fn,
        )
