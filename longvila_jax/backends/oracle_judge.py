"""The oracle judge of the caption benchmark: a deterministic :class:`ChatBackend` that scores a
candidate caption against the reference by ground-truth overlap instead of asking an LLM.

It reads the two texts out of the rendered judge prompt (``configs/eval/prompts/
caption_judge_v*.yaml`` puts them between the block markers below, and ``eval.caption_judge``
refuses a template without them) and answers the strict JSON a judge model must answer:
``{"correctness": c, "detail": d, "context": x}``, each an integer 1-5.

Facts. A reference that ``data.synthetic_long.parse_caption`` understands (the canonical caption
of a synthetic long video) is a list of scenes; each scene gives four facts anchored on its
colour (the scene's name: "a red scene"): ``(colour)``, ``(colour, number)``, ``(colour,
shapes)``, ``(colour, direction)``. The candidate is parsed the same way; a candidate the parser
refuses has no facts (the oracle only understands canonical captions when the reference is
canonical). ``matched`` is the size of the multiset intersection of the two fact lists, so it
does not depend on the order of the scenes (the context score does), a wrong number costs one
fact and a wrong colour all four of its scene. Any other reference falls back to word facts:
the set of lower-cased content words (stop words dropped), ``matched`` being the size of the
intersection, and the scene sequence of the order score being the content-word sequence.

Scores (``level(f) = 1 + floor(4 * f + 0.5)``, so 0 -> 1, 1 -> 5):

- ``recall = matched / reference facts``, ``precision = matched / candidate facts`` (0 when the
  candidate has none);
- correctness = ``level(recall * precision)``: information must be both there and right, so a
  wrong fact lowers it (Video-ChatGPT's "correctness of information");
- detail = ``level(recall)`` ("detail orientation": how much of the reference is covered);
- context = ``level(LCS / reference scenes)``, LCS the longest common subsequence of whole
  scenes (all four facts equal) of candidate and reference, in order ("contextual
  understanding": the video's course of events).

Monotone by construction: adding a correct scene in its place (the oracle captioner's caption
at more frames is a superset of the one at fewer, in order) never lowers ``matched``, the LCS or
the precision (which stays 1), and ``level`` is non-decreasing.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, Usage
from longvila_jax.data.synthetic_long import parse_caption

# The blocks of the judge template the oracle reads; each marker stands alone on its line.
REFERENCE_BEGIN, REFERENCE_END = "<<<REFERENCE>>>", "<<<END REFERENCE>>>"
CANDIDATE_BEGIN, CANDIDATE_END = "<<<CANDIDATE>>>", "<<<END CANDIDATE>>>"
MARKERS = (REFERENCE_BEGIN, REFERENCE_END, CANDIDATE_BEGIN, CANDIDATE_END)
SCENE_FACTS = ("colour", "number", "shapes", "direction")
MODEL = "oracle-judge-v1"

# Words that carry no fact: articles, auxiliaries, prepositions, pronouns.
_STOP_WORDS = (
    "a an the and or but of in on at to from for with by as is are was were be been being "
    "it its this that these those there then than so very into onto over under while during "
    "after before video clip shows show showing scene frame frames"
)
_STOP = frozenset(_STOP_WORDS.split())
_WORD_RE = re.compile(r"[a-z0-9]+")


def level(fraction: float) -> int:
    """Maps a fraction in [0, 1] to a score 1..5: ``1 + floor(4 * fraction + 0.5)``."""
    fraction = min(max(fraction, 0.0), 1.0)
    return 1 + int(math.floor(4.0 * fraction + 0.5))


def _block(prompt: str, begin: str, end: str) -> str | None:
    """The text between the ``begin`` marker and the next ``end`` marker, or None."""
    start = prompt.find(begin)
    if start < 0:
        return None
    start += len(begin)
    stop = prompt.find(end, start)
    return None if stop < 0 else prompt[start:stop].strip()


def _scenes(text: str) -> list[tuple[str, ...]]:
    """The scenes of a canonical caption as fact tuples (SCENE_FACTS order); [] if it is not
    canonical."""
    try:
        scenes = parse_caption(text)
    except (ValueError, KeyError, TypeError):
        return []
    out = []
    for scene in scenes if isinstance(scenes, list) else []:
        if not isinstance(scene, dict) or any(k not in scene for k in SCENE_FACTS):
            return []
        out.append(tuple(str(scene[k]).strip().lower() for k in SCENE_FACTS))
    return out


def _words(text: str) -> list[str]:
    """Content words in order of first appearance."""
    seen: dict[str, None] = {}
    for word in _WORD_RE.findall(text.lower()):
        if word not in _STOP:
            seen.setdefault(word, None)
    return list(seen)


def _lcs(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic program)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _facts(scenes: list[tuple[str, ...]]) -> Counter:
    """The multiset of colour-anchored facts of scenes (module docstring): 4 per scene."""
    facts: Counter = Counter()
    for colour, *rest in scenes:
        facts[(colour,)] += 1
        for name, value in zip(SCENE_FACTS[1:], rest, strict=True):
            facts[(colour, name, value)] += 1
    return facts


def judge_scores(reference: str, candidate: str) -> dict[str, int]:
    """Scores ``candidate`` against ``reference`` (module docstring).

    Returns:
      ``{"correctness": int, "detail": int, "context": int}``, each in 1..5.
    """
    ref_scenes = _scenes(reference)
    if ref_scenes:
        cand_scenes = _scenes(candidate)
        n_ref, n_cand = len(SCENE_FACTS) * len(ref_scenes), len(SCENE_FACTS) * len(cand_scenes)
        matched = sum((_facts(cand_scenes) & _facts(ref_scenes)).values())
        order = _lcs(cand_scenes, ref_scenes) / len(ref_scenes)
    else:
        ref_words, cand_words = _words(reference), _words(candidate)
        n_ref, n_cand = len(ref_words), len(cand_words)
        matched = len(set(ref_words) & set(cand_words))
        order = _lcs(cand_words, ref_words) / n_ref if n_ref else 0.0
    recall = matched / n_ref if n_ref else 0.0
    precision = matched / n_cand if n_cand else 0.0
    return {
        "correctness": level(recall * precision),
        "detail": level(recall),
        "context": level(order),
    }


class OracleJudge:
    """A judge backend that scores by ground-truth overlap (module docstring); text only, no
    model, deterministic: the same prompt always gets the same answer."""

    def __init__(self) -> None:
        self.name = "oracle"
        self.usage = Usage()

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply | BackendError]:
        """One JSON answer per rendered judge prompt; a prompt without both blocks is a
        ``malformed_request`` error for that request only."""
        out: list[ChatReply | BackendError] = []
        for request in requests:
            reference = _block(request.prompt, REFERENCE_BEGIN, REFERENCE_END)
            candidate = _block(request.prompt, CANDIDATE_BEGIN, CANDIDATE_END)
            if reference is None or candidate is None:
                out.append(
                    BackendError(
                        request.key,
                        "malformed_request",
                        "the judge prompt lacks the reference or candidate block",
                    )
                )
                self.usage.add(requests=1, failures=1)
                continue
            text = json.dumps(judge_scores(reference, candidate))
            out.append(ChatReply(text=text, model=MODEL))
            self.usage.add(requests=1)
        return out

    def close(self) -> None:
        """Nothing to release."""


__all__ = [
    "CANDIDATE_BEGIN",
    "CANDIDATE_END",
    "MARKERS",
    "REFERENCE_BEGIN",
    "REFERENCE_END",
    "OracleJudge",
    "judge_scores",
    "level",
]
