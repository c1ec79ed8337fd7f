"""Batched MM-SP generation from token ids: the ``TokenGenerator`` under ``Generator``.

A ``TokenGenerator`` holds the model's parameters replicated on a mesh, the jitted
sequence-parallel prefill (``infer.prefill``) and the jitted decode step over the
sequence-sharded KV cache (``infer.decode``) fused with next-token sampling
(``infer.sampling``). It works on token ids with one placeholder per frame and normalised
frames; it knows no tokenizer (``infer.generate.Generator`` adds prompts and text).

Compilation: the prefill compiles once per (batch, padded prompt length, frame count) and the
decode step once per (batch, cache capacity); prompt lengths are padded to ``bucket`` and cache
capacities to multiples of 8 slots per shard, so nearby requests reuse both. Sampling settings
are traced values and never recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import longvila_jax.infer.prompts as prompts
from longvila_jax.infer.cache import SeqMesh, new_slots_per_shard
from longvila_jax.infer.decode import decode_step_fn
from longvila_jax.infer.prefill import LaidOutPrompts, layout_prompts, make_prefill
from longvila_jax.infer.sampling import GREEDY, SamplingParams, sample_logits, step_key
from longvila_jax.infer.scoring import TeacherForcedScorer
from longvila_jax.parallel.attention import make_mmsp_attention
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.ulysses import kv_replication


@dataclasses.dataclass
class TokenOutput:
    """Generated ids of one prompt row.

    Attributes:
      tokens: [n] int32 generated ids, including the stop token when one ended the row.
      finish_reason: "stop" (a stop token) or "length" (``max_new_tokens`` reached).
      logits: [n, vocab] fp32 logits each token was chosen from (only with return_logits).
    """

    tokens: np.ndarray
    finish_reason: str
    logits: np.ndarray | None = None


def single_device_mesh() -> Mesh:
    """A (data, fsdp, ring, ulysses) = (1, 1, 1, 1) mesh on the first device."""
    return make_mesh(MeshConfig(), [jax.devices()[0]])


class TokenGenerator:
    """MM-SP generation from token ids for a ``LongVILA`` model.

    Args:
      model: a ``models.vlm.LongVILA`` (e.g. from ``ckpt.pretrained.load_pretrained``).
      mesh: a (data, fsdp, ring, ulysses) mesh (``parallel.mesh.make_mesh``); None = one device.
      kv_chunk: KV tokens per inner step of the prefill ring kernel.
      bucket: prompt lengths are padded to a multiple of this (and of 2 * R * U * block_size).
      block_size: attention block granularity of the mesh (``MeshConfig.block_size``).
      block_kernel: the prefill ring's block kernels (``MeshConfig.block_kernel``: "auto",
        "xla" or "pallas").
      combine: "lse" (local attention + LSE merge) or "gather" (all-gather baseline).
      compiler_options: passed to ``jax.jit`` of the prefill, the decode step and the scorer.

    Attributes:
      seq_mesh: the mesh as inference sees it (``infer.cache.SeqMesh``).
      scorer: a :class:`~longvila_jax.infer.scoring.TeacherForcedScorer` on the same mesh; its
        replicated parameters (``state``) are the ones the prefill and decode step read.
    """

    def __init__(
        self,
        model,
        *,
        mesh: Mesh | None = None,
        kv_chunk: int | None = 512,
        bucket: int = 64,
        block_size: int = 1,
        block_kernel: str = "auto",
        combine: str = "lse",
        compiler_options: dict | None = None,
    ):
        self.cfg = model.cfg
        self.seq_mesh = SeqMesh(single_device_mesh() if mesh is None else mesh)
        self.bucket, self.block_size = bucket, block_size
        llm_cfg = self.cfg.llm
        kv_replication(
            llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads, self.seq_mesh.ulysses
        )
        # One replicated copy of the parameters serves the scorer, the prefill and the decode.
        self.scorer = TeacherForcedScorer(
            model,
            self.seq_mesh.mesh,
            kv_chunk=kv_chunk,
            block_kernel=block_kernel,
            compiler_options=compiler_options,
        )
        graphdef, self.state = self.scorer.graphdef, self.scorer.state
        attention = make_mmsp_attention(
            self.seq_mesh.mesh, kv_chunk=kv_chunk, block_kernel=block_kernel
        )
        self._prefill = make_prefill(
            graphdef, attention, self.seq_mesh, compiler_options=compiler_options
        )
        step = decode_step_fn(graphdef, self.seq_mesh, combine=combine)

        def decode_and_sample(state, cache, tokens, positions, t, seed, temperature, top_p):
            cache, logits = step(state, cache, tokens, positions, t)
            # Step t appends token t and chooses token t + 1 (step_key(seed, 0) chose token 0).
            chosen = sample_logits(logits, step_key(seed, t + 1), temperature, top_p)
            return cache, logits, chosen

        self._decode = jax.jit(
            decode_and_sample, donate_argnums=(1,), compiler_options=compiler_options
        )
        self._sample = jax.jit(
            lambda logits, seed, temperature, top_p: sample_logits(
                logits, step_key(seed, 0), temperature, top_p
            )
        )

    def stop_ids(self, stop: Sequence[int | str] | None = None) -> list[int]:
        """The ids of ``stop`` (no tokenizer here: ids only); ``Generator`` adds the chat
        template's end token and the tokenizer's EOS."""
        return prompts.stop_ids(None, None, stop or ())

    def _layout(self, rows, frames_per_row) -> LaidOutPrompts:
        cfg = self.cfg
        return layout_prompts(
            rows,
            frames_per_row,
            image_token_id=cfg.image_token_id,
            tokens_per_frame=cfg.tokens_per_frame,
            vocab_size=cfg.llm.vocab_size,
            seq_mesh=self.seq_mesh,
            block_size=self.block_size,
            bucket=self.bucket,
        )

    def _device_inputs(self, laid_out: LaidOutPrompts, pixel_values, logits_index):
        """The prefill's arguments after ``state``, placed on the mesh."""
        seq_mesh = self.seq_mesh
        seq_mesh.check_batch(len(laid_out.lengths))
        by_sequence = seq_mesh.sharding("batch", "seq")
        text, visual, positions, segments = (
            jax.device_put(jnp.asarray(a), by_sequence)
            for a in (
                laid_out.text_ids,
                laid_out.visual_index,
                laid_out.positions,
                laid_out.segment_ids,
            )
        )
        pixels = None
        if pixel_values is not None and len(pixel_values):
            # Frames are split over the sequence devices for the vision tower when they divide.
            divides = len(pixel_values) % seq_mesh.num_shards == 0
            spec = P(seq_mesh.seq_axes or None) if divides else P()
            pixels = jax.device_put(jnp.asarray(pixel_values), NamedSharding(seq_mesh.mesh, spec))
        index = jnp.asarray(logits_index, jnp.int32)
        index = jax.device_put(index, seq_mesh.sharding("batch", None))
        return text, visual, pixels, positions, segments, index

    # ----------------------------------------------------------------------------- tokens
    def iter_tokens(
        self,
        rows: Sequence[np.ndarray],
        pixel_values: np.ndarray | None,
        frames_per_row: Sequence[int],
        *,
        sampling: SamplingParams = GREEDY,
        stop_ids: Sequence[int] = (),
        return_logits: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yields (tokens [B], logits [B, V] or None) once per generated position.

        Args:
          rows: B 1-D token arrays, one placeholder per frame (``prompt_ids``).
          pixel_values: [N, S, S, 3] normalised frames of all rows in row order, or None.
          frames_per_row: [B] frames of each row.
          sampling: the settings (``sampling.stop`` is not read here: ``stop_ids`` is all).
          stop_ids: a row is done once it produced one of these.
          return_logits: also yield the logits each token was chosen from.

        Generation stops after ``sampling.max_new_tokens`` or when every row has produced a
        stop id (rows that stopped earlier keep producing ignored tokens until then).
        """
        laid_out = self._layout(rows, frames_per_row)
        last = laid_out.laid_out_index(laid_out.lengths[:, None] - 1)  # each prompt's last token
        inputs = self._device_inputs(laid_out, pixel_values, last)
        slots = new_slots_per_shard(sampling.max_new_tokens, self.seq_mesh.num_shards)
        cache, logits = self._prefill(self.state, *inputs, new_slots=slots)
        logits = logits[:, 0]
        # Traced scalars: other settings reuse the compiled decode step.
        temperature, top_p = np.float32(sampling.temperature), np.float32(sampling.top_p)
        seed = np.int32(sampling.seed)
        tokens = self._sample(logits, seed, temperature, top_p)
        done = np.zeros(len(rows), bool)
        stops = np.asarray(list(stop_ids), np.int64)
        lengths = jax.device_put(jnp.asarray(laid_out.lengths), self.seq_mesh.sharding("batch"))
        for t in range(sampling.max_new_tokens):
            host_tokens = np.asarray(tokens)
            yield host_tokens, (np.asarray(logits) if return_logits else None)
            done |= np.isin(host_tokens, stops)
            if done.all() or t == sampling.max_new_tokens - 1:
                return
            # Token t goes into the cache at natural position length + t.
            cache, logits, tokens = self._decode(
                self.state, cache, tokens, lengths + t, np.int32(t), seed, temperature, top_p
            )

    def generate_tokens(
        self,
        rows: Sequence[np.ndarray],
        pixel_values: np.ndarray | None = None,
        frames_per_row: Sequence[int] | None = None,
        *,
        sampling: SamplingParams = GREEDY,
        stop_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        on_step: Callable[[np.ndarray], None] | None = None,
    ) -> list[TokenOutput]:
        """Batched generation from token ids (arguments as :meth:`iter_tokens`).

        ``stop_ids`` is the complete list of stop ids (``[]``: none); by default
        ``self.stop_ids(sampling.stop)`` (on a ``Generator`` that includes the chat template's
        end token and EOS). ``on_step`` gets each step's [B] tokens.
        """
        frames_per_row = frames_per_row if frames_per_row is not None else [0] * len(rows)
        stops = self.stop_ids(sampling.stop) if stop_ids is None else list(stop_ids)
        steps, logit_steps = [], []
        for tokens, logits in self.iter_tokens(
            rows,
            pixel_values,
            frames_per_row,
            sampling=sampling,
            stop_ids=stops,
            return_logits=return_logits,
        ):
            steps.append(tokens)
            logit_steps.append(logits)
            if on_step is not None:
                on_step(tokens)
        generated = np.stack(steps, axis=1)  # [B, steps]
        out = []
        for b in range(len(rows)):
            hit = np.flatnonzero(np.isin(generated[b], stops))
            n = int(hit[0]) + 1 if hit.size else generated.shape[1]  # keep the stop token
            logits = np.stack([x[b] for x in logit_steps[:n]]) if return_logits else None
            out.append(TokenOutput(generated[b, :n], "stop" if hit.size else "length", logits))
        return out


__all__ = ["TokenGenerator", "TokenOutput", "single_device_mesh"]
