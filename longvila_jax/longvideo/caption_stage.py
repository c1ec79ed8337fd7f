"""Stage 2 of the data engine: a captioner backend describes every clip.

Every clip of every probed video becomes one ``ChatRequest`` (the caption prompt's text, the
clip's frames as media); requests go to the backend in batches of ``batch`` (the local model
generates a batch together; an endpoint runs it with its own concurrency limit), and each
caption is journaled as soon as its batch returns, so a crash loses at most the batch in flight.
A clip whose request fails (the backend's error kind: ``timeout``, ``http_500``, ``media``...)
or whose caption is empty is counted and not journaled: the next run asks again.
"""

from __future__ import annotations

import collections
import dataclasses

from tqdm import tqdm

from longvila_jax.backends.base import BackendError, ChatBackend, ChatRequest, ClipMedia
from longvila_jax.longvideo.probe import clips_of
from longvila_jax.longvideo.prompts import Prompt
from longvila_jax.longvideo.store import Journal


def clip_key(video: str, index: int) -> str:
    """The journal key of clip ``index`` of ``video``."""
    return f"{video}#{index}"


@dataclasses.dataclass
class CaptionResult:
    """What one run of the stage did: captions made, and failures counted per kind."""

    made: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def run_captions(
    root,
    probes: Journal,
    journal: Journal,
    backend: ChatBackend,
    prompt: Prompt,
    frames_per_clip: int,
    batch: int = 8,
    progress: bool = True,
) -> CaptionResult:
    """Captions every clip of the ``ok`` videos in ``probes`` that ``journal`` lacks.

    Args:
      root: the videos' folder (journal keys are paths relative to it).
      probes: stage 1's journal.
      journal: this stage's journal (records: ``key``, ``caption``, ``model``, tokens).
      backend: the captioner.
      prompt: the caption prompt (role ``captioner``).
      frames_per_clip: frames sampled uniformly within each clip.
      batch: requests handed to the backend at once.
    """
    if batch < 1 or frames_per_clip < 1:
        raise ValueError(f"batch {batch} and frames per clip {frames_per_clip} must be >= 1")
    todo: list[ChatRequest] = []
    for rec in probes.values():
        if rec["status"] != "ok":
            continue
        for clip in clips_of(rec):
            key = clip_key(rec["key"], clip.index)
            if key in journal:
                continue
            media = ClipMedia(str(root / rec["key"]), clip.start_s, clip.end_s, frames_per_clip)
            todo.append(
                ChatRequest(
                    key=key,
                    prompt=prompt.render(),
                    system=prompt.system,
                    media=media,
                    max_tokens=prompt.max_tokens,
                    temperature=prompt.temperature,
                )
            )
    result = CaptionResult()
    bar = tqdm(total=len(todo), desc="caption", unit="clip", disable=not progress)
    for start in range(0, len(todo), batch):
        group = todo[start : start + batch]
        for req, reply in zip(group, backend.chat(group), strict=True):
            if isinstance(reply, BackendError):
                result.failed[reply.kind] += 1
            elif not reply.text.strip():
                result.failed["empty_caption"] += 1
            else:
                journal.add(
                    {
                        "key": req.key,
                        "caption": " ".join(reply.text.split()),
                        "model": reply.model,
                        "prompt_tokens": reply.prompt_tokens,
                        "completion_tokens": reply.completion_tokens,
                    }
                )
                result.made += 1
        bar.update(len(group))
    bar.close()
    return result


__all__ = ["CaptionResult", "clip_key", "run_captions"]
