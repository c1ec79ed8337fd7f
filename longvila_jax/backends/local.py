"""Our own checkpoint, in this process, as a :class:`~longvila_jax.backends.base.ChatBackend`.

:class:`LocalChat` loads a model directory as ``python -m longvila_jax.infer`` does
(``ckpt.pretrained.load_pretrained`` and ``load_tokenizer``, the release config, an optional
mesh file) into an ``infer.Generator``, and answers requests in batches through its token-level
``generate_tokens``: one prefill and one decode loop for up to ``batch_size`` requests, whose
prompts may differ in length and frame count (text-only rows have no frame).

Batches: the sampling settings are per call of ``generate_tokens``, so requests are grouped by
(temperature, seed, max_tokens) first and each group is cut into batches of ``batch_size`` in
request order; greedy and sampled requests never share a batch. A batch is padded with copies of
its last row to a multiple of the mesh's batch shards (their answers are dropped). Sampled
answers depend on the batch a request lands in (the noise is drawn per batch row); greedy
answers do not.

Prompts are built by ``infer.prompts.prompt_ids``, the one builder inference, evaluation and the
server share: ``"<image>\\n"`` per frame, then the text, in the checkpoint's chat template. A
request's ``system`` message goes in as the conversation's system turn (replacing the
template's default system prompt); without one the template's default is used.

Frames are read by ``data.clips.ClipReader`` (a killable decoder child) at the vision tower's
image size; a clip that cannot be read, or a prompt longer than the model's context, fails only
its own slot (``BackendError`` kind ``media`` / ``too_long``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

import longvila_jax.infer.prompts as prompts
from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, Usage
from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.core.errors import InputError
from longvila_jax.data.clips import ClipReader
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.infer.answer_text import AnswerText
from longvila_jax.infer.generate import Generator
from longvila_jax.infer.release import read_release_config
from longvila_jax.infer.sampling import SamplingParams
from longvila_jax.parallel.mesh import load_mesh_config, make_mesh


@dataclasses.dataclass(frozen=True)
class _Row:
    """Request ``slot`` of a batch, ready to generate: its prompt ids int32 [T] (one
    placeholder per frame) and its uint8 frames [n, S, S, 3] (n = 0: text only)."""

    slot: int
    request: ChatRequest
    ids: np.ndarray
    frames: np.ndarray


class LocalChat:
    """A chat backend over a checkpoint loaded in this process (module docstring).

    Args:
      model_dir: a project checkpoint or VILA-layout directory (with its tokenizer).
      mesh: a mesh file (``configs/mesh/*.yaml``), a built ``jax.sharding.Mesh``, or None for
        one device.
      batch_size: requests per generation batch (>= 1).
      dtype: parameter/compute dtype override (``"float32"``, ``"bfloat16"``), or None.
      clip_timeout_s: decoder child timeout per clip.

    Raises:
      CheckpointError, ConfigError: the directory or the mesh file is bad (named).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        mesh: str | Path | Mesh | None = None,
        batch_size: int = 8,
        dtype: str | None = None,
        clip_timeout_s: float = 60.0,
    ):
        engine = {}
        if isinstance(mesh, (str, Path)):
            mesh_cfg = load_mesh_config(mesh)
            mesh = make_mesh(mesh_cfg)
            engine = {"block_size": mesh_cfg.block_size, "block_kernel": mesh_cfg.block_kernel}
        generator = Generator(
            load_pretrained(model_dir, dtype=dtype),
            load_tokenizer(model_dir),
            mesh=mesh,
            release=read_release_config(model_dir),
            **engine,
        )
        self._setup(generator, f"local:{model_dir}", Path(model_dir).name, batch_size)
        self._timeout_s = clip_timeout_s

    @classmethod
    def from_generator(
        cls, generator: Generator, name: str, *, batch_size: int = 8, clip_timeout_s: float = 60.0
    ) -> LocalChat:
        """A backend over an already built ``Generator`` (with a tokenizer); ``name`` is both
        the backend's name and the ``model`` of its replies."""
        self = cls.__new__(cls)
        self._setup(generator, name, name, batch_size)
        self._timeout_s = clip_timeout_s
        return self

    def _setup(self, generator: Generator, name: str, model: str, batch_size: int) -> None:
        if generator.tokenizer is None:
            raise ValueError("LocalChat needs a Generator with a tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generator, self.name, self.model = generator, name, model
        self.batch_size = batch_size
        self.usage = Usage()
        self._reader: ClipReader | None = None

    # ------------------------------------------------------------------ requests
    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply | BackendError]:
        """Answers ``requests`` in batches (module docstring); one reply or error per request,
        in order."""
        self.usage.add(requests=len(requests))
        out: list[ChatReply | BackendError | None] = [None] * len(requests)
        rows = []
        for slot, request in enumerate(requests):
            try:
                rows.append(self._prepare(slot, request))
            except BackendError as e:
                out[slot] = e
        # Sampling settings are per batch: group rows that share them (module docstring).
        setting = lambda row: (row.request.temperature, row.request.seed, row.request.max_tokens)
        for _, group in itertools.groupby(sorted(rows, key=setting), key=setting):
            group = list(group)  # sorted() is stable: request order within a group
            for start in range(0, len(group), self.batch_size):
                for row, reply in self._generate(group[start : start + self.batch_size]):
                    out[row.slot] = reply
        failures = sum(isinstance(r, BackendError) for r in out)
        self.usage.add(failures=failures)
        return out

    def _prepare(self, slot: int, request: ChatRequest) -> _Row:
        """Frames and prompt ids of one request; BackendError(media / too_long)."""
        gen, cfg = self.generator, self.generator.cfg
        size = cfg.vision.image_size
        frames = np.zeros((0, size, size, 3), np.uint8)
        media = request.media
        if media is not None:
            if self._reader is None:
                self._reader = ClipReader(self._timeout_s)
            try:
                frames = self._reader.frames(
                    media.path, size, media.start_s, media.end_s, media.num_frames
                )
            except SampleSkipped as e:
                raise BackendError(request.key, "media", str(e)) from None
            except (InputError, OSError) as e:
                raise BackendError(request.key, "media", f"{type(e).__name__}: {e}") from None
        history = [] if request.system is None else [{"role": "system", "content": request.system}]
        try:
            ids = prompts.prompt_ids(
                gen.tokenizer,
                request.prompt,
                len(frames),
                template=gen.template,
                image_token_id=cfg.image_token_id,
                history=history,
            )
        except ValueError as e:
            raise BackendError(request.key, "prompt", str(e)) from None
        expanded = len(ids) + len(frames) * (cfg.tokens_per_frame - 1)
        context = cfg.llm.max_position_embeddings
        if expanded + request.max_tokens > context:
            raise BackendError(
                request.key,
                "too_long",
                f"{expanded} prompt tokens + max_tokens {request.max_tokens} > context {context}",
            )
        return _Row(slot, request, ids, frames)

    def _generate(self, batch: list[_Row]) -> list[tuple[_Row, ChatReply]]:
        """One batched generation of rows that share their sampling settings."""
        gen, cfg = self.generator, self.generator.cfg
        first = batch[0].request
        sampling = SamplingParams(
            max_new_tokens=first.max_tokens, temperature=first.temperature, seed=first.seed
        )
        shards = gen.seq_mesh.batch_shards
        padded = batch + [batch[-1]] * (-len(batch) % shards)
        frames_per_row = [len(row.frames) for row in padded]
        pixels = None
        if any(frames_per_row):
            pixels = gen.pixel_values(np.concatenate([row.frames for row in padded]))
        stops = gen.stop_ids()
        outputs = gen.generate_tokens(
            [row.ids for row in padded], pixels, frames_per_row, sampling=sampling, stop_ids=stops
        )
        replies = []
        for row, output in zip(batch, outputs, strict=False):  # padding rows are dropped
            tokens = [int(t) for t in output.tokens]
            if output.finish_reason == "stop":
                tokens = tokens[:-1]  # generate_tokens keeps the stop token
            answer = AnswerText(gen.tokenizer)
            for token in tokens:
                answer.add(token)
            prompt_tokens = len(row.ids) + len(row.frames) * (cfg.tokens_per_frame - 1)
            reply = ChatReply(answer.text, self.model, prompt_tokens, len(tokens))
            self.usage.add(prompt_tokens=prompt_tokens, completion_tokens=len(tokens))
            replies.append((row, reply))
        return replies

    def close(self) -> None:
        """Stops the decoder child and drops the model (its device memory goes with it)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.generator = None


__all__ = ["LocalChat"]
