"""Stage 3 of the data engine: a writer LLM turns a video's clip captions into its instructions.

A video whose every clip has a caption gets one text-only ``ChatRequest``: the writer prompt
with the video's duration and its clip lines (``data.clips.clip_line``, in order). The answer
is checked strictly (``longvideo.validate``): an answer that is not the JSON object asked for,
or that keeps no valid pair, is a bad generation and is asked again, up to ``retries`` times,
sampled at the prompt's ``retry_temperature`` with a new seed per attempt; then the video is
journaled as ``dropped`` with the reason of its last answer. A kept answer is journaled with
its pairs, the pairs dropped per reason and every raw answer (bounded), so a rerun never asks
again. A transport failure (``BackendError``) is counted and not journaled: the next run asks
again. Videos with a missing caption wait for stage 2 and are counted as ``missing_captions``.
"""

from __future__ import annotations

import collections
import dataclasses

from tqdm import tqdm

from longvila_jax.backends.base import BackendError, ChatBackend, ChatRequest
from longvila_jax.data.clips import clip_line, format_timestamp
from longvila_jax.data.skips import bound
from longvila_jax.longvideo.caption_stage import clip_key
from longvila_jax.longvideo.probe import clips_of
from longvila_jax.longvideo.prompts import Prompt
from longvila_jax.longvideo.store import Journal
from longvila_jax.longvideo.validate import BadAnswer, check_answer

MAX_RAW = 20_000  # characters of each raw answer kept in the journal


@dataclasses.dataclass
class WriteResult:
    """What one run of the stage did."""

    written: int = 0
    dropped_videos: int = 0
    waiting: int = 0  # videos whose captions are not all there
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def writer_request(rec: dict, captions: Journal, prompt: Prompt) -> ChatRequest | None:
    """The writer's request for a probed video, or None while a clip lacks its caption."""
    clips = clips_of(rec)
    lines = []
    for clip in clips:
        cap = captions.get(clip_key(rec["key"], clip.index))
        if cap is None:
            return None
        lines.append(clip_line(clip.index, clip.start_s, clip.end_s, cap["caption"]))
    text = prompt.render(
        duration=format_timestamp(rec["info"]["duration_s"]),
        num_clips=len(clips),
        clip_lines="\n".join(lines),
        max_qa=prompt.max_qa,
    )
    return ChatRequest(
        key=rec["key"],
        prompt=text,
        system=prompt.system,
        max_tokens=prompt.max_tokens,
        temperature=prompt.temperature,
    )


def run_writer(
    probes: Journal,
    captions: Journal,
    journal: Journal,
    backend: ChatBackend,
    prompt: Prompt,
    retries: int = 2,
    batch: int = 4,
    progress: bool = True,
) -> WriteResult:
    """Writes the instructions of every captioned video that ``journal`` lacks (docstring)."""
    if retries < 0 or batch < 1:
        raise ValueError(f"retries {retries} must be >= 0 and batch {batch} >= 1")
    result = WriteResult()
    todo: list[tuple[dict, ChatRequest]] = []
    for rec in probes.values():
        if rec["status"] != "ok" or rec["key"] in journal:
            continue
        req = writer_request(rec, captions, prompt)
        if req is None:
            result.waiting += 1
        else:
            todo.append((rec, req))
    bar = tqdm(total=len(todo), desc="write", unit="video", disable=not progress)
    for start in range(0, len(todo), batch):
        pending = todo[start : start + batch]
        raw: dict[str, list[str]] = collections.defaultdict(list)
        for attempt in range(retries + 1):
            if not pending:
                break
            requests = [
                req
                if attempt == 0
                else dataclasses.replace(
                    req, temperature=prompt.retry_temperature, seed=req.seed + attempt
                )
                for _, req in pending
            ]
            again = []
            for (rec, req), reply in zip(pending, backend.chat(requests), strict=True):
                if isinstance(reply, BackendError):
                    result.failed[reply.kind] += 1
                    continue
                raw[req.key].append(reply.text[:MAX_RAW])
                reason = None
                try:
                    checked = check_answer(reply.text, clips_of(rec), prompt.max_qa)
                    if not checked.qa:
                        reason = "no_valid_qa"
                except BadAnswer as e:
                    reason = e.reason
                if reason is not None:
                    result.bad_answers[reason] += 1
                    if attempt == retries:
                        journal.add(
                            {
                                "key": req.key,
                                "status": "dropped",
                                "reason": reason,
                                "attempts": attempt + 1,
                                "raw": raw[req.key],
                            }
                        )
                        result.dropped_videos += 1
                    else:
                        again.append((rec, req))
                    continue
                journal.add(
                    {
                        "key": req.key,
                        "status": "ok",
                        "summary": checked.summary,
                        "qa": [dataclasses.asdict(qa) for qa in checked.qa],
                        "dropped_qa": dict(checked.dropped),
                        "model": reply.model,
                        "attempts": attempt + 1,
                        "prompt_tokens": reply.prompt_tokens,
                        "completion_tokens": reply.completion_tokens,
                        "raw": [bound(text, MAX_RAW) for text in raw[req.key]],
                    }
                )
                result.written += 1
            pending = again
        bar.update(len(todo[start : start + batch]))
    bar.close()
    return result


__all__ = ["WriteResult", "run_writer", "writer_request"]
