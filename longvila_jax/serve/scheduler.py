"""The model's one worker thread: a bounded queue, batches of greedy requests, streamed tokens.

Every JAX call runs on this thread, so the event loop never blocks on the model. Requests are
admitted against ``max_queue`` (admitted but not yet generating: decoding media or waiting;
one more is refused with 429), then wait here until the thread takes them.

What is batched: greedy requests (``temperature`` 0) waiting at the same moment, up to
``max_batch`` rows whose prompts fit together (rows x longest prompt + budget within the
model's context), are prefilled together and decoded step by step over one sequence-sharded KV
cache (``infer.engine.TokenGenerator.iter_tokens``); greedy rows give the tokens they give
alone. The batch is padded with copies of its last row to a power of two (and a multiple of
the mesh's batch shards), so a handful of compiled shapes serves every batch size.
What is serialised: a sampled request (``temperature`` > 0) runs alone, because the sampling
noise of a row depends on the batch it is drawn in; alone, its ``seed`` reproduces the CLI's
answer. A batch is formed when the previous one ends (no row joins a running batch: the
cache's rows are laid out by the prefill).

A row ends at a stop token, a stop string, its own ``max_tokens``, its deadline, or when its
client goes away; when every row has ended the batch's iterator is closed, which frees its
cache. A finished row's slot in a running batch is only freed when the batch ends.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from longvila_jax.infer.answer_text import AnswerText
from longvila_jax.infer.sampling import SamplingParams
from longvila_jax.serve.errors import APIError
from longvila_jax.serve.metrics import Metrics


@dataclasses.dataclass(eq=False)
class Job:
    """One admitted request on its way through the scheduler.

    ``emit`` is called from the scheduler thread with ``("delta", text)``, then once with
    ``("done", finish_reason, completion_tokens)`` or ``("error", APIError)``.
    """

    ids: np.ndarray  # int32 [T] prompt ids, one placeholder per frame
    frames: np.ndarray  # float32 [n, S, S, 3] normalised frames (n may be 0)
    prompt_tokens: int  # expanded length (visual tokens included)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() after which the request times out
    emit: Callable[[tuple], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    timings: dict = dataclasses.field(default_factory=dict)
    outcome: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Scheduler:
    """Owns the ``infer.Generator`` and runs every batch on one thread.

    Args:
      generator: the ready ``infer.Generator``.
      tokenizer_lock: held around every tokenizer call (fast tokenizers are not re-entrant).
      max_queue, max_batch, context: limits (``serve.limits.Limits``; the model's context).
      metrics: the server's counters.
    """

    def __init__(self, generator, tokenizer_lock, *, max_queue, max_batch, context, metrics):
        self.gen, self.lock = generator, tokenizer_lock
        self.max_queue, self.max_batch, self.context = max_queue, max_batch, context
        self.metrics: Metrics = metrics
        self.stops = generator.stop_ids()
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._queued = 0  # admitted, not yet in a batch
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="longvila-scheduler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- admission (event loop)
    def admit(self) -> bool:
        """Reserves a queue place; False when the queue is full (the caller answers 429)."""
        with self._cond:
            if self._stopping or self._queued >= self.max_queue:
                return False
            self._queued += 1
        self.metrics.add("queued")
        return True

    def release(self) -> None:
        """Gives back a place reserved by :meth:`admit` for a request that never got a job."""
        with self._cond:
            self._queued -= 1
        self.metrics.add("queued", -1)

    def submit(self, job: Job) -> None:
        """Queues a job (its place was reserved by :meth:`admit`)."""
        job.timings["queued_at"] = time.monotonic()
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the queued and running work, then ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the thread
    def _finish(self, job: Job, outcome: str, event: tuple) -> None:
        if job.outcome is None:
            job.outcome = outcome
            self.metrics.finish(outcome)
            job.emit(event)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch = self._take()
            if batch:
                self._run(batch)

    def _take(self) -> list[Job]:
        """Removes the next batch from the queue (under the lock)."""
        now = time.monotonic()
        batch: list[Job] = []
        for job in list(self._waiting):
            dropped = job.cancelled.is_set() or now > job.deadline
            if dropped:
                self._waiting.remove(job)
            elif batch and not (self._fits(batch, job)):
                continue
            else:
                self._waiting.remove(job)
                batch.append(job)
            if dropped:
                self._queued -= 1
                self.metrics.add("queued", -1)
                if job.cancelled.is_set():
                    self._finish(job, "cancelled", ("done", "cancelled", 0))
                else:
                    self._finish(job, "timeout", ("error", _timeout()))
            if batch and (not batch[0].greedy or len(batch) == self.max_batch):
                break
        self._queued -= len(batch)
        self.metrics.add("queued", -len(batch))
        return batch

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if not (batch[0].greedy and job.greedy) or len(batch) >= self.max_batch:
            return False
        rows = _padded(len(batch) + 1, self.max_batch, self.gen.seq_mesh.batch_shards)
        longest = max(j.prompt_tokens + j.max_tokens for j in [*batch, job])
        return rows * longest <= self.context

    def _run(self, batch: list[Job]) -> None:
        self.metrics.add("running", len(batch))
        self.metrics.add("batches")
        self.metrics.add("batch_rows", len(batch))
        try:
            self._generate(batch)
        except Exception as e:  # noqa: BLE001 - a failed batch must not take the server down
            error = APIError(500, f"generation failed ({type(e).__name__})", None, "server_error")
            for job in batch:
                self._finish(job, "error", ("error", error))
        finally:
            self.metrics.add("running", -len(batch))

    def _generate(self, batch: list[Job]) -> None:
        shards = self.gen.seq_mesh.batch_shards
        rows = batch + [batch[-1]] * (_padded(len(batch), self.max_batch, shards) - len(batch))
        first = batch[0]
        sampling = SamplingParams(
            max_new_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p if not first.greedy else 1.0,
            seed=first.seed if not first.greedy else 0,
        )
        frames = [j.frames for j in rows if len(j.frames)]
        pixels = np.concatenate(frames) if frames else None
        texts = [AnswerText(self.gen.tokenizer, j.stop) for j in batch]
        counts = [0] * len(batch)
        live = [True] * len(batch)
        start = time.monotonic()
        for job in batch:
            job.timings["started_at"] = start
            self.metrics.add("prompt_tokens", job.prompt_tokens)
        steps = self.gen.iter_tokens(
            [j.ids for j in rows],
            pixels,
            [len(j.frames) for j in rows],
            sampling=sampling,
            stop_ids=self.stops,
        )
        last = start
        try:
            for step, (tokens, _) in enumerate(steps):
                now = time.monotonic()
                if step == 0:
                    self.metrics.observe("prefill_s", now - start)
                    for job in batch:
                        job.timings["first_token_at"] = now
                else:
                    self.metrics.observe("decode_s", now - last)
                    self.metrics.add("decode_tokens", sum(live))
                last = now
                for b, job in enumerate(batch):
                    if live[b]:
                        live[b] = self._advance(job, texts[b], int(tokens[b]), counts, b, now)
                if not any(live):
                    break
        finally:
            steps.close()  # frees the batch's cache
        for b, job in enumerate(batch):  # the budget ran out on the last step
            if live[b]:
                self._done(job, texts[b], "length", counts[b])

    def _advance(self, job, text, token, counts, b, now) -> bool:
        """Feeds one token to a row; returns whether the row goes on."""
        if job.cancelled.is_set():
            self._finish(job, "cancelled", ("done", "cancelled", counts[b]))
            return False
        if now > job.deadline:
            self._finish(job, "timeout", ("error", _timeout()))
            return False
        counts[b] += 1
        if token in self.stops:
            self._done(job, text, "stop", counts[b])
            return False
        with self.lock:
            delta = text.add(token)
        if delta:
            job.emit(("delta", delta))
        if text.stopped:
            self._done(job, text, "stop", counts[b])
            return False
        if counts[b] >= job.max_tokens:
            self._done(job, text, "length", counts[b])
            return False
        return True

    def _done(self, job: Job, text: AnswerText, reason: str, count: int) -> None:
        rest = text.flush()
        if rest:
            job.emit(("delta", rest))
        job.timings["done_at"] = time.monotonic()
        self.metrics.add("completion_tokens", count)
        self._finish(job, "ok", ("done", reason, count))


def _padded(rows: int, max_batch: int, shards: int) -> int:
    """Rows a batch of ``rows`` requests runs with: the next power of two (at most
    ``max_batch``), rounded up to a multiple of the mesh's batch shards."""
    n = 1
    while n < rows:
        n *= 2
    n = max(min(n, max_batch), rows)
    return -(-n // shards) * shards


def _timeout() -> APIError:
    return APIError(504, "the request timed out (--timeout-s)", None, "timeout")


__all__ = ["Job", "Scheduler"]
