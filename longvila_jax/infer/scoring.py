"""Teacher-forced scoring: the one forward that reads logits at chosen positions of a prompt,
and the one scorer that turns them into predictions and log-probabilities.

The evaluations never generate: they run one forward over a prompt (plus, when an answer is
scored, the teacher-forced answer) and read the logits at a few positions.
:class:`TeacherForcedScorer` does exactly that, on one device or sequence-parallel over a mesh,
for the ``Generator`` (:meth:`Generator.teacher_forced`), V-NIAH, VideoMME and the held-out
accuracy:

- frames are encoded once (``encode``, fixed-size batches so one compilation serves all) into a
  flat visual-token table that callers reuse across prompts (V-NIAH embeds the haystack once
  and only changes which table rows each frame slot points to);
- ``logits_at`` embeds the expanded sequence (``LongVILA.embed``), runs the LLM trunk and applies
  the head only at the query positions, so [B, T, V] logits are never materialised;
- :func:`score_answer` reads greedy predictions and log-probabilities of a reference answer from
  those logits (V-NIAH's and the held-out set's exact match).

With a mesh the sequence is padded to a multiple of 2 * ring * ulysses, put in the 2D zigzag
layout (``parallel.layouts``) and sharded over (ring, ulysses); attention is the MM-SP kernel
(``parallel.attention.make_mmsp_attention``). Query positions are mapped through the same
permutation, so results come back in natural order. This replaces the original V-NIAH's
zigzag split over 8 processes + all-gather of the argmax (``llava/eval/vision_niah_vila``).
Without a mesh the forward is the dense single-device one (``core.attention.dense_attention``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.core.attention import dense_attention
from longvila_jax.infer.cache import SeqMesh
from longvila_jax.infer.prompts import pixel_values
from longvila_jax.models.vlm import expand_prompts
from longvila_jax.parallel.attention import make_mmsp_attention
from longvila_jax.parallel.layouts import apply_layout, inverse_permutation, zigzag_2d_permutation


@dataclasses.dataclass
class TeacherForced:
    """Greedy predictions of a reference answer under teacher forcing.

    Attributes:
      answer_ids: [K] the reference answer's tokens.
      predicted_ids: [K] int32 argmax of the logits at each answer position.
      logprobs: [K] fp32 log-probability of each reference token.
      exact_match: every predicted id equals the reference id.
    """

    answer_ids: np.ndarray
    predicted_ids: np.ndarray
    logprobs: np.ndarray
    exact_match: bool


def score_answer(logits: np.ndarray, answer_ids: np.ndarray) -> TeacherForced:
    """Scores a reference answer from the logits that predict its tokens (host numpy, fp32).

    Args:
      logits: [K, V] logits; row k predicts answer token k.
      answer_ids: [K] int reference tokens.

    Returns:
      :class:`TeacherForced`.
    """
    logits = np.asarray(logits)
    answer_ids = np.asarray(answer_ids)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    predicted = logits.argmax(-1).astype(np.int32)
    return TeacherForced(
        answer_ids=answer_ids,
        predicted_ids=predicted,
        logprobs=log_softmax[np.arange(len(answer_ids)), answer_ids],
        exact_match=bool(np.array_equal(predicted, answer_ids)),
    )


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
    hidden = model.llm.hidden(
        inputs_embeds=x, positions=positions, segment_ids=segment_ids, attn_fn=attn_fn
    )
    at_queries = jnp.take_along_axis(hidden, query_index[..., None], axis=1)
    return model.llm.logits(at_queries)


@functools.lru_cache(maxsize=16)
def _jitted(
    graphdef,
    seq_mesh: SeqMesh | None,
    kv_chunk: int | None,
    block_kernel: str,
    compiler_options: tuple,
):
    """(encode, logits_at) jitted once per model structure, mesh and options, so that scorers
    built for new weights (or new runs) reuse the compiled executables."""
    if seq_mesh is None:
        attn, x_sharding = dense_attention, None
    else:
        attn = make_mmsp_attention(seq_mesh.mesh, kv_chunk=kv_chunk, block_kernel=block_kernel)
        x_sharding = seq_mesh.sharding("batch", "seq", None)
    options = dict(compiler_options) or None
    encode = jax.jit(functools.partial(_encode, graphdef), compiler_options=options)
    logits = jax.jit(
        functools.partial(_logits_at, graphdef, attn, x_sharding), compiler_options=options
    )
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
      block_kernel: the ring's block kernels, "auto", "xla" or "pallas" (``MeshConfig``).
      compiler_options: passed to ``jax.jit`` (tests lower XLA's optimisation level).

    Attributes:
      graphdef, state: the split model; ``state`` is the (replicated) parameters, which the
        ``Generator`` shares instead of holding a second copy.
    """

    def __init__(
        self,
        model,
        mesh: Mesh | None = None,
        *,
        encode_batch: int = 32,
        kv_chunk: int | None = 512,
        block_kernel: str = "auto",
        compiler_options: dict | None = None,
    ):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
        self.cfg = model.cfg
        self.mesh = mesh
        self.seq_mesh = None if mesh is None else SeqMesh(mesh)
        self.graphdef, state = nnx.split(model)
        if self.seq_mesh is not None:
            state = jax.device_put(state, NamedSharding(mesh, P()))
        self.state = state
        # The layout needs 2 * ring * ulysses chunks; one device needs no padding at all.
        shards = 1 if self.seq_mesh is None else self.seq_mesh.num_shards
        self.multiple = 1 if self.seq_mesh is None else 2 * shards
        # A multiple of the SP size so that every device encodes the same number of frames.
        self.encode_batch = -(-encode_batch // shards) * shards
        options = tuple(sorted((compiler_options or {}).items()))
        self._encode_fn, self._logits_fn = _jitted(
            self.graphdef, self.seq_mesh, kv_chunk, block_kernel, options
        )

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame

    def encode(self, frames: np.ndarray) -> jax.Array:
        """Visual tokens of video frames.

        Args:
          frames: uint8 [N, S, S, 3] RGB with S = ``cfg.vision.image_size`` (or floats already
            normalised, see ``prompts.pixel_values``).

        Returns:
          [N * tokens_per_frame, D] in compute dtype (replicated on the mesh, if any).
        """
        size, batch = self.cfg.vision.image_size, self.encode_batch
        frames = np.asarray(frames)
        chunks = []
        for start in range(0, len(frames), batch):
            # Checked and normalised one batch at a time: thousands of normalised float32
            # frames need not fit in host memory at once.
            chunk = pixel_values(frames[start : start + batch], size)
            real = chunk.shape[0]
            if real < batch:  # pad the last batch: one compilation for every batch
                chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), "f4")])
            pixels = jnp.asarray(chunk)
            if self.seq_mesh is not None:
                # MM-SP stage 1: the frames of one encode batch are split over the SP devices.
                pixels = jax.device_put(pixels, self.seq_mesh.sharding("seq"))
            tokens = self._encode_fn(self.state, pixels)
            chunks.append(tokens[: real * self.tokens_per_frame])
        table = jnp.concatenate(chunks) if chunks else jnp.zeros((0, self.cfg.llm.hidden_size))
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
        if self.seq_mesh is not None:
            self.seq_mesh.check_batch(b)
        lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
        total = self.padded_length(max(t, pad_to or 0))
        pad = total - t
        text = np.pad(text_ids, ((0, 0), (0, pad)))
        visual = np.pad(visual_index, ((0, 0), (0, pad)), constant_values=-1)
        positions = np.broadcast_to(np.arange(total, dtype=np.int32), (b, total))
        segments = (positions < lengths[:, None]).astype(np.int32)  # 0 = padding
        query = query_index
        if self.seq_mesh is not None:
            perm = zigzag_2d_permutation(total, self.seq_mesh.ring, self.seq_mesh.ulysses)
            arrays = (apply_layout(a, perm) for a in (text, visual, positions, segments))
            sharding = self.seq_mesh.sharding("batch", "seq")
            text, visual, positions, segments = (jax.device_put(a, sharding) for a in arrays)
            query = inverse_permutation(perm)[query_index]  # natural q sits at slot inv[q]
        if visual_tokens.shape[0] == 0:  # text-only prompt: a dummy row keeps the gather valid
            visual_tokens = jnp.zeros((1, visual_tokens.shape[1]), visual_tokens.dtype)
        logits = self._logits_fn(
            self.state, text, visual, visual_tokens, positions, segments, query
        )
        return np.asarray(logits)

    def score(
        self,
        ids: np.ndarray,
        frames: np.ndarray,
        answer_ids: np.ndarray,
        *,
        query: np.ndarray | None = None,
    ) -> TeacherForced:
        """Scores a reference answer inside one prompt row under teacher forcing.

        Args:
          ids: [T] int token ids with one placeholder per frame, the answer's tokens included.
          frames: [n, S, S, 3] frames of the row (uint8, or normalised floats).
          answer_ids: [K] the reference answer's tokens.
          query: [K] expanded positions whose logits predict the answer's tokens; default the
            K positions before the last K tokens (the answer ends the row).

        Returns:
          :class:`TeacherForced`.
        """
        expanded = expand_prompts(
            np.asarray(ids)[None],
            num_frames=len(frames),
            image_token_id=self.cfg.image_token_id,
            tokens_per_frame=self.tokens_per_frame,
            vocab_size=self.cfg.llm.vocab_size,
        )
        if query is None:
            # Logits at position p predict token p + 1: the answer is read from T - K - 1 on.
            length, k = expanded.text_ids.shape[1], len(answer_ids)
            query = np.arange(length - k - 1, length - 1, dtype=np.int32)
        table = self.encode(frames)
        logits = self.logits_at(expanded.text_ids, expanded.visual_index, table, query[None])
        return score_answer(logits[0], answer_ids)


__all__ = ["TeacherForced", "TeacherForcedScorer", "score_answer"]
