"""Long-video generation with MM-SP: the ``Generator`` Python API.

A ``Generator`` wraps a ``LongVILA`` model, its tokenizer and a mesh. Per request it samples
and decodes the video frames, renders the chat prompt (``infer.prompts``:
``"<image>\\n" * n + question`` in the model's template), runs the sequence-parallel prefill
and then decodes token by token over the sequence-sharded cache (``infer.engine``, the
token-level ``TokenGenerator`` it extends), streaming text as it goes. How tokens are chosen and
when generation stops is one :class:`~longvila_jax.infer.sampling.SamplingParams`.

Typical use::

    gen = Generator(load_pretrained(ckpt), load_tokenizer(ckpt), mesh=mesh)
    for piece in gen.stream("What happens?", video="clip.mp4", num_frames=64):
        print(piece, end="", flush=True)
    gen.generate("What happens?", video="clip.mp4", sampling=SamplingParams(temperature=0.7))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

import longvila_jax.infer.prompts as prompts
from longvila_jax.data.text import IMAGE_TOKEN
from longvila_jax.data.video import decode_video
from longvila_jax.infer.answer_text import AnswerText
from longvila_jax.infer.chat_format import ChatFormat, chat_format
from longvila_jax.infer.engine import TokenGenerator
from longvila_jax.infer.frames import decode_inference_frames
from longvila_jax.infer.release import ReleaseConfig
from longvila_jax.infer.sampling import GREEDY, SamplingParams
from longvila_jax.infer.scoring import TeacherForced


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
class _RunStats:
    """What :meth:`Generator._run` measures while it yields tokens."""

    num_frames: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "length"
    prefill_s: float = 0.0
    second_token_at: float = 0.0  # clock when the first decode step (which may compile) ended
    last_token_at: float = 0.0


class Generator(TokenGenerator):
    """MM-SP inference for a ``LongVILA`` model: questions about videos in, text out.

    Args:
      model: a ``models.vlm.LongVILA`` (e.g. from ``ckpt.pretrained.load_pretrained``).
      tokenizer: its Hugging Face fast tokenizer (``<image>`` must map to cfg.image_token_id);
        None when only the token-level methods (``iter_tokens``, ``generate_tokens``) are used.
      mesh: a (data, fsdp, ring, ulysses) mesh (``parallel.mesh.make_mesh``); None = one device.
      template: a built-in template name (``qwen2`` / ``llama_3``) or a
        :class:`~longvila_jax.infer.chat_format.ChatFormat`; default the checkpoint's own
        (``infer.chat_format.chat_format``: the release config's named template, the
        tokenizer's ``chat_template``, else the built-in one of the LLM arch).
      release: the checkpoint's upstream settings (``infer.release.read_release_config``);
        when given, frames follow upstream's inference rule (``infer.frames``) with its
        ``num_video_frames`` / ``fps`` as defaults, and prompts keep the automatic BOS.
      **engine: ``kv_chunk``, ``bucket``, ``block_size``, ``block_kernel``, ``combine``,
        ``compiler_options`` of :class:`~longvila_jax.infer.engine.TokenGenerator`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        template: str | ChatFormat | None = None,
        release: ReleaseConfig | None = None,
        **engine,
    ):
        if tokenizer is not None:
            tokenizer_image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            if tokenizer_image != model.cfg.image_token_id:
                raise ValueError(
                    f"tokenizer maps {IMAGE_TOKEN} to {tokenizer_image} but the model's "
                    f"image_token_id is {model.cfg.image_token_id}"
                )
        super().__init__(model, mesh=mesh, **engine)
        self.tokenizer = tokenizer
        self.release = release
        if template is None and tokenizer is not None:
            named = release.chat_template if release is not None else None
            template = chat_format(tokenizer, self.cfg.llm.arch, named, release is not None)
        self.template = template or prompts.template_for(self.cfg)

    # ----------------------------------------------------------------------------- inputs
    def load_frames(
        self, video: str, num_frames: int | None = None, fps: float | None = None
    ) -> np.ndarray:
        """Samples frames from a video file: uint8 [n, S, S, 3], S = the tower's image size.

        With ``release`` (an upstream checkpoint): upstream's inference rule
        (``infer.frames``): ``fps > 0`` takes one frame every ``1/fps`` s from the start, at
        most ``num_frames``; ``fps == 0`` spreads ``num_frames`` over the video; both default
        to the release config's (``num_video_frames``, else 8). Otherwise the training rule:
        ``num_frames`` (default 8) uniformly spaced frames, or about ``fps`` frames per second
        when the video is shorter than ``num_frames / fps`` seconds.
        """
        size = self.cfg.vision.image_size
        release = self.release
        if release is not None:
            n = num_frames or release.num_video_frames or 8
            return decode_inference_frames(video, size, n, release.fps if fps is None else fps)
        return decode_video(video, size, num_frames or 8, max_fps=fps or 0.0, min_frames=1)

    def pixel_values(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [n, S, S, 3] -> normalised float32; float input is taken as normalised."""
        return prompts.pixel_values(frames, self.cfg.vision.image_size)

    def prompt_ids(self, question: str, num_frames: int) -> np.ndarray:
        """Token ids of the chat prompt ``"<image>\\n" * n + question`` ending with the
        assistant header (generation prompt); see ``infer.prompts.prompt_ids``."""
        return prompts.prompt_ids(
            self.tokenizer,
            question,
            num_frames,
            template=self.template,
            image_token_id=self.cfg.image_token_id,
        )

    def stop_ids(self, stop: Sequence[int | str] | None = None) -> list[int]:
        """The template's end token and the tokenizer's EOS, plus ``stop`` (ids or tokens)."""
        return prompts.stop_ids(self.tokenizer, self.template, stop or ())

    def _frames(self, video, frames, num_frames, fps) -> np.ndarray:
        if (video is None) == (frames is None):
            raise ValueError("pass exactly one of video (a file) and frames (an array)")
        return self.load_frames(video, num_frames, fps) if video is not None else frames

    # ----------------------------------------------------------------------------- text
    def stream(
        self,
        question: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        sampling: SamplingParams = GREEDY,
    ) -> Iterator[str]:
        """Yields the answer's text as it is generated (arguments as :meth:`generate`)."""
        frames = self._frames(video, frames, num_frames, fps)
        for _, delta in self._run(question, frames, sampling, _RunStats()):
            if delta:
                yield delta

    def generate(
        self,
        question: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        sampling: SamplingParams = GREEDY,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Answers ``question`` about a video.

        Args:
          question: the user's question (``<image>``/``<video>`` tags are removed).
          video: a video file, sampled with ``num_frames`` / ``fps``; or
          frames: uint8 [n, S, S, 3] frames already sampled (or normalised float32).
          num_frames, fps: frame sampling (see :meth:`load_frames`; None: the defaults).
          sampling: token budget, temperature (0 = greedy), top_p, seed and extra stop tokens
            (:class:`~longvila_jax.infer.sampling.SamplingParams`; default greedy, 128 tokens).
          on_text: called with every new piece of text as soon as it is decodable.

        Returns:
          :class:`Generation`.
        """
        frames = self._frames(video, frames, num_frames, fps)
        stats = _RunStats()
        ids, pieces = [], []
        for token, delta in self._run(question, frames, sampling, stats):
            ids.append(token)
            if delta:
                pieces.append(delta)
                if on_text is not None:
                    on_text(delta)
        steady = len(ids) - 2  # decode steps after the first one
        per_token = (stats.last_token_at - stats.second_token_at) / steady if steady > 0 else 0.0
        return Generation(
            text="".join(pieces),
            tokens=np.asarray(ids, np.int32),
            finish_reason=stats.finish_reason,
            num_frames=stats.num_frames,
            prompt_tokens=stats.prompt_tokens,
            prefill_s=stats.prefill_s,
            decode_s_per_token=per_token,
        )

    def _run(
        self, question: str, frames: np.ndarray, sampling: SamplingParams, stats: _RunStats
    ) -> Iterator[tuple[int, str]]:
        """Yields (token id, new text) per generated token and fills ``stats`` as it goes."""
        n = len(frames)
        pixels = self.pixel_values(frames) if n else None
        ids = self.prompt_ids(question, n)
        stops = self.stop_ids(sampling.stop)
        stats.num_frames = n
        stats.prompt_tokens = len(ids) + n * (self.cfg.tokens_per_frame - 1)
        start = time.perf_counter()
        answer = AnswerText(self.tokenizer)  # no stop strings: stop ids end the loop
        steps = self.iter_tokens([ids], pixels, [n], sampling=sampling, stop_ids=stops)
        for k, (tokens, _) in enumerate(steps):
            now = time.perf_counter()
            if k == 0:
                stats.prefill_s = now - start
            elif k == 1:  # the first decode step compiles; steady-state timing starts after it
                stats.second_token_at = now
            stats.last_token_at = now
            token = int(tokens[0])
            if token in stops:
                stats.finish_reason = "stop"
                yield token, ""
                return
            yield token, answer.add(token)

    def teacher_forced(
        self,
        question: str,
        answer: str,
        *,
        video: str | None = None,
        frames: np.ndarray | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> TeacherForced:
        """Scores ``answer`` under teacher forcing with the MM-SP forward (V-NIAH's metric).

        The prompt is followed by the answer's tokens; the prediction for answer token j is the
        argmax of the logits at the position before it (:meth:`TeacherForcedScorer.score`).
        """
        frames = self._frames(video, frames, num_frames, fps)
        prompt = self.prompt_ids(question, len(frames))
        answer_ids = prompts.answer_ids(self.tokenizer, answer)
        return self.scorer.score(np.concatenate([prompt, answer_ids]), frames, answer_ids)


__all__ = ["Generation", "Generator"]
