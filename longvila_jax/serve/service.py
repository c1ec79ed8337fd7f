"""The served model: loading and compiling it, and turning a checked request into a job.

``Service.load`` runs once, in the background while the HTTP server already answers
``/health`` (503 until it is done): the checkpoint is loaded and verified
(``ckpt.pretrained.load_pretrained``), the generator is built exactly as
``python -m longvila_jax.infer`` builds it (same release settings, chat format, mesh, block
kernel), the decoder children are started, and one warm-up generation compiles the prefill and
the decode step at the default frame count. Only then is the service ready.

``Service.prepare`` (on a worker thread of the event loop) decodes the media, builds the prompt
with the one prompt builder (``infer.prompts.prompt_ids``, the CLI's; earlier turns as its
``history``), checks the expanded length against the limits and makes the scheduler's job.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from longvila_jax.infer import prompts
from longvila_jax.serve.errors import bad_request
from longvila_jax.serve.limits import Limits
from longvila_jax.serve.media import MediaDecoder
from longvila_jax.serve.metrics import Metrics
from longvila_jax.serve.request import ChatRequest
from longvila_jax.serve.scheduler import Job, Scheduler


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to serve and how (the CLI's flags).

    Attributes:
      model: checkpoint directory (project or VILA layout).
      model_id: the name clients put in ``model`` (default: the directory's name).
      mesh: mesh file, or None for one device.
      tokenizer: tokenizer directory (default: from ``model``).
      template: a built-in chat template name, or None for the checkpoint's own.
      dtype: parameter/compute dtype override, or None.
      media_root: folder that video/image paths are resolved under, or None.
    """

    model: str
    model_id: str
    mesh: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    dtype: str | None = None
    media_root: str | None = None


class Service:
    """The model, its decoder and its scheduler, once :meth:`load` has run."""

    def __init__(self, spec: ModelSpec, limits: Limits, metrics: Metrics | None = None):
        self.spec, self.limits = spec, limits
        self.metrics = metrics or Metrics()
        self.tokenizer_lock = threading.Lock()
        self.state = "loading"  # -> "ready" | "failed"
        self.error: str | None = None
        self.created = int(time.time())
        self.generator = self.scheduler = self.decoder = None
        self.model_cfg = None

    # ------------------------------------------------------------------- start-up
    def load(self) -> None:
        """Loads, builds and warms the model (module docstring); sets ``state``."""
        from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
        from longvila_jax.infer.generate import Generator
        from longvila_jax.infer.release import read_release_config
        from longvila_jax.parallel.mesh import load_mesh_config, make_mesh

        spec = self.spec
        mesh_cfg = load_mesh_config(spec.mesh) if spec.mesh else None
        model = load_pretrained(spec.model, dtype=spec.dtype)
        tokenizer = load_tokenizer(spec.tokenizer or spec.model)
        release = read_release_config(spec.model)
        self.generator = Generator(
            model,
            tokenizer,
            mesh=make_mesh(mesh_cfg) if mesh_cfg else None,
            block_size=mesh_cfg.block_size if mesh_cfg else 1,
            block_kernel=mesh_cfg.block_kernel if mesh_cfg else "auto",
            template=spec.template,
            release=release,
        )
        cfg = self.model_cfg = model.cfg
        self.limits = self.limits.for_context(cfg.llm.max_position_embeddings)
        self.decoder = MediaDecoder(
            cfg.vision.image_size, self.limits, release=release, media_root=spec.media_root
        )
        self._warm_up()
        self.scheduler = Scheduler(
            self.generator,
            self.tokenizer_lock,
            max_queue=self.limits.max_queue,
            max_batch=self.limits.max_batch,
            context=cfg.llm.max_position_embeddings,
            metrics=self.metrics,
        )
        self.state = "ready"

    def _warm_up(self) -> None:
        """One generation at the default frame count compiles the prefill and decode step."""
        from longvila_jax.infer.sampling import SamplingParams

        n = int(self.decoder.video_args(None, None)["num_frames"])
        size = self.model_cfg.vision.image_size
        frames = np.zeros((n, size, size, 3), np.uint8)
        budget = SamplingParams(max_new_tokens=self.limits.default_new_tokens)
        self.generator.generate("Warm-up.", frames=frames, sampling=budget)

    def close(self) -> None:
        """Finishes the scheduler's work and stops the decoder children."""
        if self.scheduler is not None:
            self.scheduler.stop(timeout=self.limits.drain_timeout_s)
        if self.decoder is not None:
            self.decoder.close()

    # ------------------------------------------------------------------- requests
    def prepare(self, request: ChatRequest, emit, admitted_at: float) -> Job:
        """Media -> frames, prompt -> ids, limits checked: the scheduler's job.

        Raises:
          APIError: 400 naming the field (undecodable media, too long a prompt, ...).
        """
        t0 = time.monotonic()
        frames = self.decoder.frames(request.media, request.frames, request.fps)
        if request.media:
            self.metrics.observe("decode_media_s", time.monotonic() - t0)
        gen, cfg = self.generator, self.model_cfg
        try:
            with self.tokenizer_lock:
                ids = prompts.prompt_ids(
                    gen.tokenizer,
                    request.question,
                    len(frames),
                    template=gen.template,
                    image_token_id=cfg.image_token_id,
                    history=request.history,
                )
        except ValueError as e:
            raise bad_request(
                "messages", f"the prompt cannot be built: {e}", "invalid_prompt"
            ) from None
        prompt_tokens = len(ids) + len(frames) * (cfg.tokens_per_frame - 1)
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise bad_request(
                "messages",
                f"the prompt is {prompt_tokens} tokens ({len(frames)} frames x "
                f"{cfg.tokens_per_frame} visual tokens included) > {self.limits.max_prompt_tokens}",
                "context_length_exceeded",
            )
        context = cfg.llm.max_position_embeddings
        if prompt_tokens + request.max_tokens > context:
            raise bad_request(
                "max_tokens",
                f"{prompt_tokens} prompt tokens + max_tokens {request.max_tokens} > the model's "
                f"context {context}",
                "context_length_exceeded",
            )
        job = Job(
            ids=ids,
            frames=gen.pixel_values(frames) if len(frames) else frames,
            prompt_tokens=prompt_tokens,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
            deadline=admitted_at + self.limits.timeout_s,
            emit=emit,
        )
        job.timings.update(admitted_at=admitted_at, media_s=time.monotonic() - t0)
        job.timings["frames"] = len(frames)
        return job

    def describe(self) -> dict:
        """The model entry of ``GET /v1/models``."""
        return {
            "id": self.spec.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "longvila-jax",
            "root": str(Path(self.spec.model).name),
        }


__all__ = ["ModelSpec", "Service"]
