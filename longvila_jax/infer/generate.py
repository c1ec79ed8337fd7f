"""Long-video generation with MM-SP: the ``Generator`` Python API.

A ``Generator`` wraps a ``LongVILA`` model, its tokenizer and a mesh. Per request it samples
and decodes the video frames, renders the chat prompt (``"<image>\\n" * n + question`` in the
model's template), runs the sequence-parallel prefill (``infer.prefill``) and then decodes token
by token over the sequence-sharded cache (``infer.decode``), streaming text as it goes.

Compilation: the prefill compiles once per (batch, padded prompt length, frame count) and the
decode step once per (batch, cache capacity); prompt lengths are padded to ``bucket`` and cache
capacities to multiples of 8 slots per shard, so nearby requests reuse both. Sampling settings
are traced values and never recompile.

Typical use::

    gen = Generator(load_pretrained(ckpt), load_tokenizer(ckpt), mesh=mesh)
    for piece in gen.stream("What happens?", video="clip.mp4", num_frames=64):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.infer.cache import SeqMesh, new_slots_per_shard
from longvila_jax.infer.decode import decode_step_fn
from longvila_jax.infer.prefill import LaidOutPrompts, layout_prompts, make_prefill
from longvila_jax.infer.sampling import check_sampling, sample_logits, step_key
from longvila_jax.parallel.attention import make_mmsp_attention
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.ulysses import kv_replication

TEMPLATE_OF_ARCH = {"qwen2": "qwen2", "llama": "llama_3"}


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


@dataclasses.dataclass
class Generation:
    """Result of :meth:`Generator.generate` (one video, one question)."""

    text: str
    tokens: np.ndarray
    finish_reason: str
    num_frames: int
    prompt_tokens: int  # expanded prompt length (visual tokens included)
    prefill_s: float  # wall time to the first token (compilation included on a first call)
    decode_s_per_token: float  # mean over decode steps after the first (which may compile)


@dataclasses.dataclass
class TeacherForced:
    """Result of :meth:`Generator.teacher_forced`: greedy predictions under teacher forcing."""

    answer_ids: np.ndarray  # [n] the reference answer's tokens
    predicted_ids: np.ndarray  # [n] argmax of the logits at each answer position
    logprobs: np.ndarray  # [n] log-probability of each reference token
    exact_match: bool  # every predicted id equals the reference id


def single_device_mesh() -> Mesh:
    """A (data, fsdp, ring, ulysses) = (1, 1, 1, 1) mesh on the first device."""
    return make_mesh(MeshConfig(), [jax.devices()[0]])


class Generator:
    """MM-SP inference for a ``LongVILA`` model.

    Args:
      model: a ``models.vlm.LongVILA`` (e.g. from ``ckpt.pretrained.load_pretrained``).
      tokenizer: its Hugging Face fast tokenizer (``<image>`` must map to cfg.image_token_id).
      mesh: a (data, fsdp, ring, ulysses) mesh (``parallel.mesh.make_mesh``); None = one device.
      template: chat template name (``qwen2`` / ``llama_3``); default from the LLM arch.
      kv_chunk: KV tokens per inner step of the prefill ring kernel.
      bucket: prompt lengths are padded to a multiple of this (and of 2 * R * U * block_size).
      block_size: attention block granularity of the mesh (``MeshConfig.block_size``).
      combine: "lse" (local attention + LSE merge) or "gather" (all-gather baseline).
      compiler_options: passed to ``jax.jit`` of the prefill and decode step.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        template: str | None = None,
        kv_chunk: int | None = 512,
        bucket: int = 64,
        block_size: int = 1,
        combine: str = "lse",
        compiler_options: dict | None = None,
    ):
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.sm = SeqMesh(single_device_mesh() if mesh is None else mesh)
        self.template = template or TEMPLATE_OF_ARCH[self.cfg.llm.arch]
        self.bucket, self.block_size = bucket, block_size
        lc = self.cfg.llm
        kv_replication(lc.num_attention_heads, lc.num_key_value_heads, self.sm.ulysses)
        tok_image = tokenizer.convert_tokens_to_ids("<image>") if tokenizer is not None else None
        if tokenizer is not None and tok_image != self.cfg.image_token_id:
            raise ValueError(
                f"tokenizer maps <image> to {tok_image} but the model's image_token_id is "
                f"{self.cfg.image_token_id}"
            )
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.sm.mesh, P()))
        attn = make_mmsp_attention(self.sm.mesh, kv_chunk=kv_chunk)
        self._prefill = make_prefill(graphdef, attn, self.sm, compiler_options=compiler_options)
        step = decode_step_fn(graphdef, self.sm, combine=combine)

        def decode_and_sample(state, cache, tokens, positions, t, seed, temperature, top_p):
            cache, logits = step(state, cache, tokens, positions, t)
            nxt = sample_logits(logits, step_key(seed, t + 1), temperature, top_p)
            return cache, logits, nxt

        self._decode = jax.jit(
            decode_and_sample, donate_argnums=(1,), compiler_options=compiler_options
        )
        self._sample = jax.jit(
            lambda lg, seed, temp, p: sample_logits(lg, step_key(seed, 0), temp, p)
        )

    # ----------------------------------------------------------------------------- inputs
    def load_frames(self, video: str, num_frames: int = 8, fps: float = 0.0) -> np.ndarray:
        """Samples frames from a video file: uint8 [n, S, S, 3], S = the tower's image size.

        ``num_frames`` uniformly spaced frames, or about ``fps`` frames per second when the
        video is shorter than ``num_frames / fps`` seconds (LongVILA's rule).
        """
        from longvila_jax.data.video import decode_video

        return decode_video(
            video, self.cfg.vision.image_size, num_frames, max_fps=fps, min_frames=1
        )

    def pixel_values(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [n, S, S, 3] -> normalised float32; float input is taken as normalised."""
        from longvila_jax.data.image import normalize

        frames = np.asarray(frames)
        s = self.cfg.vision.image_size
        if frames.ndim != 4 or frames.shape[1:] != (s, s, 3):
            raise ValueError(f"frames must have shape [n, {s}, {s}, 3], got {frames.shape}")
        return normalize(frames) if frames.dtype == np.uint8 else frames.astype(np.float32)

    def prompt_ids(self, question: str, num_frames: int) -> np.ndarray:
        """Token ids of the chat prompt ``"<image>\\n" * n + question`` ending with the
        assistant header (generation prompt)."""
        from longvila_jax.data.text import TEMPLATES, media_prompt

        messages = [{"role": "user", "content": media_prompt(question, num_frames)}]
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=TEMPLATES[self.template],
            tokenize=False,
            add_generation_prompt=True,
        )
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    def stop_ids(self, stop: Sequence[int | str] | None = None) -> list[int]:
        """The template's end token and the tokenizer's EOS, plus ``stop`` (ids or tokens)."""
        from longvila_jax.data.text import END_TOKENS

        ids = set()
        if self.tokenizer is not None:
            for tok in (END_TOKENS[self.template], self.tokenizer.eos_token):
                i = self.tokenizer.convert_tokens_to_ids(tok) if tok else None
                if i is not None and i != self.tokenizer.unk_token_id:
                    ids.add(int(i))
        for s in stop or ():
            ids.add(int(s) if isinstance(s, (int, np.integer)) else self._token_id(s))
        return sorted(ids)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"stop token {token!r} is not a single token (ids {ids})")
        return int(ids[0])

    def _layout(self, rows, frames_per_row) -> LaidOutPrompts:
        c = self.cfg
        return layout_prompts(
            rows,
            frames_per_row,
            image_token_id=c.image_token_id,
            tokens_per_frame=c.tokens_per_frame,
            vocab_size=c.llm.vocab_size,
            sm=self.sm,
            block_size=self.block_size,
            bucket=self.bucket,
        )

    def _device_inputs(self, lp: LaidOutPrompts, pixel_values, logits_index):
        sm = self.sm
        sm.check_batch(len(lp.lengths))
        seq = sm.sharding("batch", "seq")
        arrs = [
            jax.device_put(jnp.asarray(a), seq)
            for a in (lp.text_ids, lp.visual_index, lp.positions, lp.segment_ids)
        ]
        pix = None
        if pixel_values is not None and len(pixel_values):
            # Frames are split over the sequence devices for the vision tower when they divide.
            frames = P(sm.seq_axes or None) if len(pixel_values) % sm.num_shards == 0 else P()
            pix = jax.device_put(jnp.asarray(pixel_values), NamedSharding(sm.mesh, frames))
        idx = jax.device_put(jnp.asarray(logits_index, jnp.int32), sm.sharding("batch", None))
        return arrs[0], arrs[1], pix, arrs[2], arrs[3], idx

    # ----------------------------------------------------------------------------- core
    def forward_logits(
        self,
        rows: Sequence[np.ndarray],
        pixel_values: np.ndarray | None,
        frames_per_row: Sequence[int],
        natural_positions: np.ndarray,
    ) -> np.ndarray:
        """MM-SP forward (no cache) returning logits at chosen positions.

        Args:
          rows: B 1-D token arrays (placeholders included); pixel_values: [N, S, S, 3]
            normalised frames of all rows in row order (or None); frames_per_row: [B].
          natural_positions: [B, K] int positions in each row's expanded sequence.

        Returns:
          [B, K, vocab] fp32 logits.
        """
        lp = self._layout(rows, frames_per_row)
        pos = np.asarray(natural_positions)
        if pos.ndim != 2 or pos.shape[0] != len(rows):
            raise ValueError(f"natural_positions must be [{len(rows)}, K], got {pos.shape}")
        if (pos < 0).any() or (pos >= lp.lengths[:, None]).any():
            raise ValueError("natural_positions outside a row's expanded length")
        inputs = self._device_inputs(lp, pixel_values, lp.laid_out_index(pos))
        _, logits = self._prefill(self.state, *inputs, new_slots=None)
        return np.asarray(logits)

    def iter_tokens(
        self,
        rows: Sequence[np.ndarray],
        pixel_values: np.ndarray | None,
        frames_per_row: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        return_logits: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yields (tokens [B], logits [B, V] or None) once per generated position.

        Stops after ``max_new_tokens`` or when every row has produced a stop id (rows that
        stopped earlier keep producing ignored tokens until then).
        """
        check_sampling(temperature, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lp = self._layout(rows, frames_per_row)
        inputs = self._device_inputs(lp, pixel_values, lp.laid_out_index(lp.lengths[:, None] - 1))
        slots = new_slots_per_shard(max_new_tokens, self.sm.num_shards)
        cache, logits = self._prefill(self.state, *inputs, new_slots=slots)
        logits = logits[:, 0]
        temp, p, sd = np.float32(temperature), np.float32(top_p), np.int32(seed)
        tok = self._sample(logits, sd, temp, p)
        done = np.zeros(len(rows), bool)
        stops = np.asarray(list(stop_ids), np.int64)
        batch = self.sm.sharding("batch")
        lengths = jax.device_put(jnp.asarray(lp.lengths), batch)
        for t in range(max_new_tokens):
            tok_np = np.asarray(tok)
            yield tok_np, (np.asarray(logits) if return_logits else None)
            done |= np.isin(tok_np, stops)
            if done.all() or t == max_new_tokens - 1:
                return
            cache, logits, tok = self._decode(
                self.state, cache, tok, lengths + t, np.int32(t), sd, temp, p
            )

    def generate_tokens(
        self,
        rows: Sequence[np.ndarray],
        pixel_values: np.ndarray | None = None,
        frames_per_row: Sequence[int] | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        on_step: Callable[[np.ndarray], None] | None = None,
    ) -> list[TokenOutput]:
        """Batched generation from token ids (see :meth:`iter_tokens`); ``on_step`` gets each
        step's [B] tokens. ``stop_ids`` default to :meth:`stop_ids`."""
        frames_per_row = frames_per_row if frames_per_row is not None else [0] * len(rows)
        stops = self.stop_ids() if stop_ids is None else list(stop_ids)
        steps, logit_steps = [], []
        for tok, lg in self.iter_tokens(
            rows,
            pixel_values,
            frames_per_row,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_ids=stops,
            return_logits=return_logits,
        ):
            steps.append(tok)
            logit_steps.append(lg)
            if on_step is not None:
                on_step(tok)
        toks = np.stack(steps, axis=1)
        out = []
        for b in range(len(rows)):
            hit = np.flatnonzero(np.isin(toks[b], stops))
            n = int(hit[0]) + 1 if hit.size else toks.shape[1]
            lg = np.stack([x[b] for x in logit_steps[:n]]) if return_logits else None
            out.append(TokenOutput(toks[b, :n], "stop" if hit.size else "length", lg))
        return out

    # ----------------------------------------------------------------------------- text
    def _frames(self, video, frames, num_frames, fps) -> np.ndarray:
        if (video is None) == (frames is None):
            raise ValueError("pass exactly one of video (a file) and frames (an array)")
        return self.load_frames(video, num_frames, fps) if video is not None else frames

    def stream(
        self,
        question: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int = 8,
        fps: float = 0.0,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[int | str] | None = None,
    ) -> Iterator[str]:
        """Yields the answer's text as it is generated (arguments as :meth:`generate`)."""
        for _, delta in self._run(
            question,
            video,
            frames,
            num_frames,
            fps,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
            {},
        ):
            if delta:
                yield delta

    def generate(
        self,
        question: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int = 8,
        fps: float = 0.0,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[int | str] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Answers ``question`` about a video.

        Args:
          question: the user's question (``<image>``/``<video>`` tags are removed).
          video: a video file, sampled with ``num_frames`` / ``fps``; or
          frames: uint8 [n, S, S, 3] frames already sampled (or normalised float32).
          num_frames, fps: frame sampling (see :meth:`load_frames`).
          max_new_tokens: generation budget; temperature (0 = greedy), top_p: sampling.
          seed: PRNG seed (same seed and inputs give the same tokens).
          stop: extra stop tokens (ids or single-token strings) besides the template's end
            token and EOS.
          on_text: called with every new piece of text as soon as it is decodable.

        Returns:
          :class:`Generation`.
        """
        info: dict = {}
        ids, pieces = [], []
        for tok, delta in self._run(
            question,
            video,
            frames,
            num_frames,
            fps,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
            info,
        ):
            ids.append(tok)
            if delta:
                pieces.append(delta)
                if on_text is not None:
                    on_text(delta)
        steady = len(ids) - 2  # decode steps after the first one
        return Generation(
            text="".join(pieces),
            tokens=np.asarray(ids, np.int32),
            finish_reason=info["finish_reason"],
            num_frames=info["num_frames"],
            prompt_tokens=info["prompt_tokens"],
            prefill_s=info["prefill_s"],
            decode_s_per_token=(info["end"] - info["second"]) / steady if steady > 0 else 0.0,
        )

    def _run(
        self,
        question,
        video,
        frames,
        num_frames,
        fps,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop,
        info,
    ) -> Iterator[tuple[int, str]]:
        """Yields (token id, new text) per generated token; fills ``info`` with statistics."""
        frames = self._frames(video, frames, num_frames, fps)
        n = len(frames)
        pix = self.pixel_values(frames) if n else None
        ids = self.prompt_ids(question, n)
        stops = self.stop_ids(stop)
        info.update(num_frames=n, prompt_tokens=len(ids) + n * (self.cfg.tokens_per_frame - 1))
        info["finish_reason"] = "length"
        start = time.perf_counter()
        out: list[int] = []
        emitted = ""
        for k, (tok, _) in enumerate(
            self.iter_tokens(
                [ids],
                pix,
                [n],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_ids=stops,
            )
        ):
            now = time.perf_counter()
            if k == 0:
                info["prefill_s"], info["first"] = now - start, now
            elif k == 1:  # the first decode step compiles; steady-state timing starts after it
                info["second"] = now
            info["end"] = now
            t = int(tok[0])
            if t in stops:
                info["finish_reason"] = "stop"
                yield t, ""
                return
            out.append(t)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                yield t, ""
                continue
            delta = text[len(emitted) :] if text.startswith(emitted) else text
            emitted = text
            yield t, delta

    def teacher_forced(
        self,
        question: str,
        answer: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int = 8,
        fps: float = 0.0,
    ) -> TeacherForced:
        """Scores ``answer`` under teacher forcing with the MM-SP forward (V-NIAH's metric).

        The prompt is followed by the answer's tokens; the prediction for answer token j is the
        argmax of the logits at the position before it.
        """
        frames = self._frames(video, frames, num_frames, fps)
        n = len(frames)
        pix = self.pixel_values(frames) if n else None
        prompt = self.prompt_ids(question, n)
        ans = np.asarray(self.tokenizer(answer, add_special_tokens=False)["input_ids"], np.int32)
        if ans.size == 0:
            raise ValueError("answer tokenises to nothing")
        row = np.concatenate([prompt, ans])
        start = len(prompt) + n * (self.cfg.tokens_per_frame - 1)  # expanded prompt length
        pos = (start - 1 + np.arange(len(ans)))[None]
        logits = self.forward_logits([row], pix, [n], pos)[0]
        logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
        pred = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        return TeacherForced(
            answer_ids=ans,
            predicted_ids=pred,
            logprobs=np.asarray(jnp.take_along_axis(logp, jnp.asarray(ans)[:, None], 1)[:, 0]),
            exact_match=bool(np.array_equal(pred, ans)),
        )


__all__ = [
    "Generation",
    "Generator",
    "TeacherForced",
    "TokenOutput",
    "single_device_mesh",
]
