"""Teacher-forced scoring forward shared by the evaluations (V-NIAH, VideoMME-style).

The evaluations never generate: they run one forward over a prompt (plus, for V-NIAH, the
teacher-forced answer) and read the logits at a few positions. :class:`TeacherForcedScorer`
does exactly that, on one device or sequence-parallel over a mesh:

- frames are encoded once (``encode``, fixed-size batches so one compilation serves all) into a
  flat visual-token table that callers reuse across prompts (V-NIAH embeds the haystack once
  and only changes which table rows each frame slot points to);
- ``logits_at`` embeds the expanded sequence (``LongVILA.embed``), runs the LLM trunk and applies
  the head only at the query positions, so [B, T, V] logits are never materialised.

With a mesh the sequence is padded to a multiple of 2 * ring * ulysses, put in the 2D zigzag
layout (``parallel.layouts``) and sharded over (ring, ulysses); attention is the MM-SP kernel
(``parallel.attention.make_mmsp_attention``). Query positions are mapped through the same
permutation, so results come back in natural order. This replaces the original V-NIAH's
zigzag split over 8 processes + all-gather of the argmax (``llava/eval/vision_niah_vila``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.core.attention import dense_attention
from longvila_jax.data.image import normalize
from longvila_jax.parallel.layouts import apply_layout, inverse_permutation, zigzag_2d_permutation


def _axis(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.shape else 1


def _encode(graphdef, state, pixels):
    model = nnx.merge(graphdef, state)
    return model.encode_frames(pixels)


def _logits_at(
    graphdef,
    attn_fn,
    x_sharding,
    state,
    text_ids,
    visual_index,
    visual_tokens,
    positions,
    segment_ids,
    query_index,
):
    model = nnx.merge(graphdef, state)
    x = model.embed(text_ids, visual_index, visual_tokens)
    if x_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, x_sharding)
    h = model.llm.hidden(
        inputs_embeds=x, positions=positions, segment_ids=segment_ids, attn_fn=attn_fn
    )
    hq = jnp.take_along_axis(h, query_index[..., None], axis=1)
    return model.llm.logits(hq)


def _mesh_axes(mesh: Mesh) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    seq = tuple(a for a in ("ring", "ulysses") if a in mesh.shape) or None
    return batch, seq


@functools.lru_cache(maxsize=16)
def _jitted(graphdef, mesh: Mesh | None, kv_chunk: int | None):
    """(encode, logits_at) jitted once per model structure and mesh, so that scorers built
    for new weights (or new runs) reuse the compiled executables."""
    if mesh is None:
        attn, x_sharding = dense_attention, None
    else:
        from longvila_jax.parallel.attention import make_mmsp_attention

        batch, seq = _mesh_axes(mesh)
        attn = make_mmsp_attention(mesh, kv_chunk=kv_chunk)
        x_sharding = NamedSharding(mesh, P(batch or None, seq, None))
    encode = jax.jit(functools.partial(_encode, graphdef))
    logits = jax.jit(functools.partial(_logits_at, graphdef, attn, x_sharding))
    return encode, logits


class TeacherForcedScorer:
    """One-forward scoring of prompts with precomputed visual tokens.

    Args:
      model: a ``LongVILA`` (its parameters are copied, replicated onto ``mesh`` when given;
        the model itself is not modified).
      mesh: optional mesh with ``ring`` / ``ulysses`` axes (``parallel.mesh.make_mesh``); None
        runs on one device with dense attention.
      encode_batch: frames per vision-tower call (upstream V-NIAH uses 32).
      kv_chunk: inner KV chunk of the ring kernel (see ``make_mmsp_attention``).
    """

    def __init__(
        self,
        model,
        mesh: Mesh | None = None,
        *,
        encode_batch: int = 32,
        kv_chunk: int | None = 512,
    ):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
        self.cfg = model.cfg
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        if mesh is None:
            self.ring = self.ulysses = 1
            self.batch_axes: tuple[str, ...] = ()
            self._seq_sharding = self._frame_sharding = None
        else:
            self.ring, self.ulysses = _axis(mesh, "ring"), _axis(mesh, "ulysses")
            self.batch_axes, seq = _mesh_axes(mesh)
            self._seq_sharding = NamedSharding(mesh, P(self.batch_axes or None, seq))
            # MM-SP stage 1: the frames of one encode batch are split over the SP devices.
            self._frame_sharding = NamedSharding(mesh, P(seq))
            state = jax.device_put(state, NamedSharding(mesh, P()))
        self.multiple = 2 * self.ring * self.ulysses if mesh is not None else 1
        n_sp = self.ring * self.ulysses
        # A multiple of the SP size so that every device encodes the same number of frames.
        self.encode_batch = -(-encode_batch // n_sp) * n_sp
        self._state = state
        self._encode_fn, self._logits_fn = _jitted(graphdef, mesh, kv_chunk)

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame

    def encode(self, frames: np.ndarray) -> jax.Array:
        """Visual tokens of uint8 RGB frames.

        Args:
          frames: uint8 [N, S, S, 3] with S = ``cfg.vision.image_size``.

        Returns:
          [N * tokens_per_frame, D] in compute dtype (replicated on the mesh, if any).
        """
        frames = np.asarray(frames)
        size = self.cfg.vision.image_size
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [N, {size}, {size}, 3], got {frames.dtype} {frames.shape}"
            )
        n, bs = frames.shape[0], self.encode_batch
        out = []
        for start in range(0, n, bs):
            chunk = normalize(frames[start : start + bs])
            real = chunk.shape[0]
            if real < bs:  # pad the last batch: one compilation for every batch
                chunk = np.concatenate([chunk, np.zeros((bs - real, *chunk.shape[1:]), "f4")])
            px = jnp.asarray(chunk)
            if self._frame_sharding is not None:
                px = jax.device_put(px, self._frame_sharding)
            tokens = self._encode_fn(self._state, px)
            out.append(tokens[: real * self.tokens_per_frame])
        table = jnp.concatenate(out) if out else jnp.zeros((0, self.cfg.llm.hidden_size))
        if self.mesh is not None:
            table = jax.device_put(table, NamedSharding(self.mesh, P()))
        return table

    def padded_length(self, length: int) -> int:
        """``length`` rounded up to the layout multiple (2 * ring * ulysses; 1 on one device)."""
        return -(-length // self.multiple) * self.multiple

    def logits_at(
        self,
        text_ids: np.ndarray,
        visual_index: np.ndarray,
        visual_tokens: jax.Array,
        query_index: np.ndarray,
        *,
        lengths: Sequence[int] | None = None,
        pad_to: int | None = None,
    ) -> np.ndarray:
        """fp32 logits at the query positions of expanded sequences (natural token order).

        Args:
          text_ids: [B, T] int text ids (any value at visual positions).
          visual_index: [B, T] int rows of ``visual_tokens`` per position, -1 for text.
          visual_tokens: [M, D] table from :meth:`encode` (possibly concatenated tables).
          query_index: [B, K] int positions (< T) whose next-token logits are wanted.
          lengths: real length of every row (default T); later positions are padding.
          pad_to: pad T up to at least this (then to the layout multiple), so calls with
            different T share one compilation.

        Returns:
          float32 [B, K, vocab_size].
        """
        text_ids = np.asarray(text_ids, np.int32)
        visual_index = np.asarray(visual_index, np.int32)
        query_index = np.asarray(query_index, np.int32)
        b, t = text_ids.shape
        if visual_index.shape != (b, t):
            raise ValueError(f"visual_index {visual_index.shape} must match text_ids {(b, t)}")
        if query_index.ndim != 2 or query_index.shape[0] != b:
            raise ValueError(f"query_index must be [{b}, K], got {query_index.shape}")
        if query_index.size and (query_index.min() < 0 or query_index.max() >= t):
            raise ValueError(f"query_index values must lie in [0, {t}), got {query_index}")
        if visual_index.max(initial=-1) >= visual_tokens.shape[0]:
            raise ValueError(
                f"visual_index refers to row {visual_index.max()} of a "
                f"{visual_tokens.shape[0]}-row visual token table"
            )
        b_size = int(np.prod([self.mesh.shape[a] for a in self.batch_axes])) if self.mesh else 1
        if b % b_size:
            raise ValueError(f"batch {b} is not divisible by the mesh batch axes ({b_size})")
        lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
        total = self.padded_length(max(t, pad_to or 0))
        pad = total - t
        text = np.pad(text_ids, ((0, 0), (0, pad)))
        vis = np.pad(visual_index, ((0, 0), (0, pad)), constant_values=-1)
        pos = np.broadcast_to(np.arange(total, dtype=np.int32), (b, total))
        seg = (pos < lengths[:, None]).astype(np.int32)
        query = query_index
        if self.mesh is not None:
            perm = zigzag_2d_permutation(total, self.ring, self.ulysses)
            text, vis, pos, seg = (apply_layout(a, perm) for a in (text, vis, pos, seg))
            # Natural position q sits at layout slot inv[q].
            query = inverse_permutation(perm)[query_index]
            text, vis, pos, seg = (
                jax.device_put(a, self._seq_sharding) for a in (text, vis, pos, seg)
            )
        if visual_tokens.shape[0] == 0:  # text-only prompt: a dummy row keeps the gather valid
            visual_tokens = jnp.zeros((1, visual_tokens.shape[1]), visual_tokens.dtype)
        logits = self._logits_fn(self._state, text, vis, visual_tokens, pos, seg, query)
        return np.asarray(logits)


__all__ = ["TeacherForcedScorer"]
