"""Oracle backends: a captioner and a writer that read the synthetic corpus' ground truth.

They let tests check every stage of the long-video data engine exactly: what the oracle says is
true by construction, so any error downstream is the pipeline's.

- :class:`OracleCaptioner` answers a request about a clip of a long synthetic video
  (``data.synthetic_long``) from its truth sidecar: it samples the clip's frames with the
  engine's own rule (``data.clips.clip_indices``), finds the scenes those frames show
  (``scenes_in_range``) and answers their canonical caption. The same rule captions a whole
  video at F frames, so more frames see more scenes.
- :class:`OracleWriter` reads the clip lines of the writer prompt (``data.clips.CLIP_LINE_RE``),
  parses each caption (``parse_caption``) and answers the writer JSON: a summary and question-
  answer pairs in every category of :data:`CATEGORIES`, each true given the captions, citing the
  clips it rests on, with timestamps inside those clips.
- :func:`answer_chat` is the same pair for a loopback stub HTTP server, with the captioner
  reading the PIXELS it is sent (``read_clip``) instead of a sidecar.

Token counts in :class:`~longvila_jax.backends.base.Usage` are whitespace word counts of the
prompt (system + user) and the answer: there is no tokenizer behind an oracle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, Usage
from longvila_jax.core.errors import InputError
from longvila_jax.data.clips import CLIP_LINE_RE, clip_indices, format_timestamp, parse_timestamp
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.synthetic_long import (
    caption_for_scenes,
    frame_times,
    load_truth,
    parse_caption,
    read_clip,
    scenes_in_range,
)

CATEGORIES = ("summary", "temporal_order", "counting", "attributes", "actions", "causal", "needle")
_FACTS = ("colour", "number", "shapes", "direction")


def _words(*texts: str | None) -> int:
    return sum(len(t.split()) for t in texts if t)


def caption_clip(path: str, start_s: float, end_s: float, num_frames: int) -> str:
    """The oracle's caption of ``[start_s, end_s)`` of a long synthetic video sampled at
    ``num_frames`` frames. Raises InputError (no or bad sidecar) or SampleSkipped (no frame)."""
    truth = load_truth(path)
    idx = clip_indices(truth["fps"], truth["frame_count"], start_s, end_s, num_frames)
    return caption_for_scenes(scenes_in_range(truth, start_s, end_s, frame_times(truth, idx)))


class _Oracle:
    """Shared batch loop: one answer or one ``BackendError`` per request, usage counted."""

    name = "oracle"
    model = "oracle"

    def __init__(self):
        self.usage = Usage()

    def _answer(self, request: ChatRequest) -> str:
        raise NotImplementedError

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply | BackendError]:
        out: list[ChatReply | BackendError] = []
        for r in requests:
            prompt_tokens = _words(r.system, r.prompt)
            try:
                text = self._answer(r)
            except BackendError as e:
                self.usage.add(requests=1, failures=1, prompt_tokens=prompt_tokens)
                out.append(e)
                continue
            completion = _words(text)
            self.usage.add(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion)
            out.append(ChatReply(text, self.model, prompt_tokens, completion))
        return out

    def close(self) -> None:
        """Nothing to release."""


class OracleCaptioner(_Oracle):
    """Captions clips of long synthetic videos from their truth sidecars (module docstring).

    A request without media or a video without a (valid) sidecar fails in its slot with kind
    ``no_truth``; a range that holds no frame with kind ``media``.
    """

    model = "oracle-captioner"

    def _answer(self, request: ChatRequest) -> str:
        m = request.media
        if m is None:
            raise BackendError(request.key, "no_truth", "the oracle captioner needs a clip")
        try:
            return caption_clip(m.path, m.start_s, m.end_s, m.num_frames)
        except InputError as e:
            raise BackendError(request.key, "no_truth", str(e)) from None
        except SampleSkipped as e:
            raise BackendError(request.key, "media", str(e)) from None


class OracleWriter(_Oracle):
    """Writes the summary and QA JSON from the clip captions in the prompt (module docstring).

    A prompt without clip lines, or with a caption that is not the oracle captioner's wording,
    fails in its slot with kind ``unparsable_captions``.
    """

    model = "oracle-writer"

    def _answer(self, request: ChatRequest) -> str:
        try:
            return write_instructions(request.prompt)
        except ValueError as e:
            raise BackendError(request.key, "unparsable_captions", str(e)) from None


def answer_chat(role: str, prompt: str, frames: np.ndarray | None = None) -> str:
    """What an oracle answers to one chat, for a stub OpenAI-compatible server in the tests.

    Args:
      role: ``captioner`` (answers from ``frames``' pixels: ``read_clip`` then
        ``caption_for_scenes``; the prompt is ignored) or ``writer`` (as :class:`OracleWriter`).
      prompt: the user message's text.
      frames: uint8 [n, S, S, 3] frames of the clip, in time order (captioner only).

    Returns:
      the assistant message's text.

    Raises:
      ValueError: unknown role, no frames for the captioner, unreadable frames or captions.
    """
    if role == "captioner":
        if frames is None or len(frames) == 0:
            raise ValueError("the captioner needs frames")
        return caption_for_scenes(read_clip(frames))
    if role == "writer":
        return write_instructions(prompt)
    raise ValueError(f"no oracle for role {role!r}")


def _parse_clips(prompt: str) -> list[dict]:
    """The prompt's clip lines, in time order: index, start, end (seconds), scenes."""
    clips = []
    for line in prompt.splitlines():
        m = CLIP_LINE_RE.match(line.strip())
        if m is None:
            continue
        try:
            scenes = parse_caption(m[4])
        except ValueError as e:
            raise ValueError(f"clip {m[1]}: {e}") from None
        start, end = parse_timestamp(m[2]), parse_timestamp(m[3])
        clips.append({"index": int(m[1]), "start": start, "end": end, "scenes": scenes})
    if not clips:
        raise ValueError("the prompt holds no clip line ([clip i | MM:SS-MM:SS] caption)")
    if len({c["index"] for c in clips}) != len(clips):
        raise ValueError("the prompt repeats a clip index")
    return sorted(clips, key=lambda c: (c["start"], c["index"]))


def _segments(clips: list[dict]) -> list[dict]:
    """The video's scenes as the captions tell them: consecutive equal scenes (a scene spanning
    two clips) merged; each with the clips it shows in, and those showing only it."""
    segs: list[dict] = []
    for c in clips:
        for s in c["scenes"]:
            facts = {k: s[k] for k in _FACTS}
            if segs and segs[-1]["facts"] == facts and c["index"] not in segs[-1]["clips"]:
                segs[-1]["clips"].append(c["index"])
            elif not segs or segs[-1]["facts"] != facts:
                segs.append({"facts": facts, "clips": [c["index"]], "only": []})
            if len(c["scenes"]) == 1:
                segs[-1]["only"].append(c)
    return segs


def _mid(clip: dict) -> str:
    """A timestamp inside the clip whatever fraction of a second its floored start hides: the
    middle second, or the start for a clip shorter than 2 s."""
    span = clip["end"] - clip["start"]
    return format_timestamp(clip["start"] + (math.floor(span / 2) if span >= 2 else 0))


def _qa(category: str, question: str, answer: str, clips: Sequence[int]) -> dict:
    return {"category": category, "question": question, "answer": answer, "clips": sorted(clips)}


def _questions(clips: list[dict], segs: list[dict]) -> list[dict]:
    """Every QA the captions support (before de-duplication), at least one per category."""
    by_index = {c["index"]: c for c in clips}
    every = [c["index"] for c in clips]
    colours = [s["facts"]["colour"] for s in segs]
    numbers = [s["facts"]["number"] for s in segs]
    qa = [_qa("counting", "How many scenes does the video show?", str(len(segs)), every)]
    for j, seg in enumerate(segs):
        f, cited = seg["facts"], seg["clips"]
        unique_colour = colours.count(f["colour"]) == 1
        if unique_colour and j + 1 < len(segs):
            nxt = segs[j + 1]
            q = f"Which colour comes right after the {f['colour']} scene?"
            a = f"The {nxt['facts']['colour']} scene comes right after the {f['colour']} scene."
            qa.append(_qa("temporal_order", q, a, {*cited, *nxt["clips"]}))
        if numbers.count(f["number"]) == 1:
            q = f"What colour is the background when the number {f['number']} is shown?"
            qa.append(_qa("attributes", q, f"The background is {f['colour']}.", cited))
        if unique_colour:
            q = f"In which direction do the squares move during the {f['colour']} scene?"
            qa.append(_qa("actions", q, f"The squares move {f['direction']}.", cited))
        if seg["only"]:
            c = seg["only"][0]
            q = f"How many white squares move across the screen at {_mid(c)}?"
            qa.append(_qa("counting", q, str(f["shapes"]), [c["index"]]))
        for c in seg["only"]:
            span = f"{format_timestamp(c['start'])} and {format_timestamp(c['end'])}"
            q = f"What number is shown between {span}?"
            qa.append(_qa("needle", q, f["number"], [c["index"]]))
        if j + 1 < len(segs):
            qa.append(_causal(seg, segs[j + 1], by_index))
    if len(segs) == 1 or not any(q["category"] == "temporal_order" for q in qa):
        a = f"The first scene is {colours[0]}."
        qa.append(_qa("temporal_order", "Which colour is shown first?", a, segs[0]["clips"]))
    first = segs[0]["facts"]
    if not any(q["category"] == "attributes" for q in qa):
        q = "What colour is the background at the start of the video?"
        qa.append(
            _qa("attributes", q, f"The background is {first['colour']}.", [clips[0]["index"]])
        )
    if not any(q["category"] == "actions" for q in qa):
        q = "In which direction do the squares move at the start of the video?"
        a = f"The squares move {first['direction']}."
        qa.append(_qa("actions", q, a, [clips[0]["index"]]))
    if len(segs) == 1:
        q = f"Why does the number {first['number']} stay on screen for the whole video?"
        a = f"Because the whole video is one {first['colour']} scene, and a scene keeps its number."
        qa.append(_qa("causal", q, a, every))
    if not any(q["category"] == "needle" for q in qa):
        c = clips[0]
        span = f"{format_timestamp(c['start'])} and {format_timestamp(c['end'])}"
        q = f"What number is shown first between {span}?"
        qa.append(_qa("needle", q, c["scenes"][0]["number"], [c["index"]]))
    return qa


def _causal(seg: dict, nxt: dict, by_index: dict[int, dict]) -> dict:
    """Why something changes between two consecutive scenes; the change's time is named when it
    falls on a clip boundary (the end of the earlier scene's last clip)."""
    a, b = seg["facts"], nxt["facts"]
    last, first = seg["clips"][-1], nxt["clips"][0]
    at = ""
    if last != first:
        at = f" at {format_timestamp(by_index[last]['end'])}"
    cited = {last, first}
    if a["number"] != b["number"]:
        q = f"Why does the number change from {a['number']} to {b['number']}{at}?"
        ans = f"Because the scene changes from {a['colour']} to {b['colour']}{at}, and each scene"
        return _qa("causal", q, ans + " shows its own number.", cited)
    q = f"Why does the background change from {a['colour']} to {b['colour']}{at}?"
    ans = f"Because a new scene begins{at}: the {a['colour']} scene ends and the {b['colour']} one"
    return _qa("causal", q, ans + " starts.", cited)


def write_instructions(prompt: str) -> str:
    """The writer JSON (``{"summary": ..., "qa": [...]}``) for the clip lines in ``prompt``.

    Raises:
      ValueError: no clip line, a repeated clip index, or a caption ``parse_caption`` refuses.
    """
    clips = _parse_clips(prompt)
    segs = _segments(clips)
    count = f"{len(segs)} scene" + ("s" if len(segs) != 1 else "")
    summary = f"The video shows {count} in turn. " + caption_for_scenes([s["facts"] for s in segs])
    qa, seen = [], set()
    everything = [_qa("summary", "Summarize the video.", summary, [c["index"] for c in clips])]
    for item in everything + _questions(clips, segs):
        key = " ".join(item["question"].lower().split())  # the validator's uniqueness rule
        if key not in seen:
            seen.add(key)
            qa.append(item)
    return json.dumps({"summary": summary, "qa": qa})


__all__ = [
    "CATEGORIES",
    "OracleCaptioner",
    "OracleWriter",
    "answer_chat",
    "caption_clip",
    "write_instructions",
]
