"""The caption benchmark's judge side: the versioned prompt file, rendering one judge request,
parsing the judge's answer strictly, retrying bad answers, and the per-frame-count means with
their bootstrap intervals.

The prompt file (``configs/eval/prompts/caption_judge_<version>.yaml``) holds the detailed-caption
instruction the captioned model gets and the judge's system message and user template; the
rubric and its source are in the file's header and in ``docs/caption_benchmark.md``. A judge
must answer one JSON object ``{"correctness": c, "detail": d, "context": x}`` with integers
1..5, optionally inside a Markdown code fence; anything else is malformed (:func:`parse_scores`),
and :func:`judge_captions` asks again with a new seed, then counts the caption as failed: a bad
answer never becomes a score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from longvila_jax.backends.base import BackendError, ChatBackend, ChatReply, ChatRequest
from longvila_jax.backends.oracle_judge import MARKERS, REFERENCE_BEGIN, REFERENCE_END
from longvila_jax.core.errors import ConfigError, brief
from longvila_jax.core.safe_load import parse_json, parse_yaml
from longvila_jax.core.safe_paths import check_name, read_regular

DIMENSIONS = ("correctness", "detail", "context")
SCORE_MIN, SCORE_MAX = 1, 5
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval" / "prompts"
_PLACEHOLDER_RE = re.compile(r"\{(reference|candidate)\}")
_FENCE_RE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)
MAX_ANSWER_CHARS = 4000  # a judge answer is a one-line object; longer is not one


class MalformedScores(ValueError):
    """A judge answer that is not exactly the score object; the message says why."""


@dataclasses.dataclass(frozen=True)
class JudgePrompt:
    """One version of the benchmark's prompts.

    Attributes:
      version: the file's ``version`` field (``caption-judge-v1``).
      path: the file it was read from.
      sha256: hex digest of the file's bytes (recorded in the results).
      caption_prompt: the detailed-caption instruction for the captioned model.
      system, template: the judge's system message and user template (``{reference}`` and
        ``{candidate}`` inside the oracle's marker blocks).
      max_tokens, temperature: the judge's budget and first-attempt temperature.
      retry_temperature: the temperature of a retry after a malformed answer.
    """

    version: str
    path: str
    sha256: str
    caption_prompt: str
    system: str
    template: str
    max_tokens: int
    temperature: float
    retry_temperature: float


def _field(data: dict, key: str, kind: type | tuple, what: str):
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(what, f"missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{what}.{key}", f"expected {kind}, got {brief(value)}")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{what}.{key}", "is empty")
    return value


def load_prompt(version: str, prompts_dir: str | Path = PROMPTS_DIR) -> JudgePrompt:
    """Reads and checks ``prompts_dir/caption_judge_<version>.yaml``.

    Raises:
      ConfigError: naming the file or field: a bad version name, a missing file, a missing or
        mistyped field, a template without exactly one of each marker and placeholder, or a
        placeholder outside its marker block.
    """
    name = check_name(f"caption_judge_{version}.yaml", "--prompt-version", ConfigError)
    path = Path(prompts_dir) / name
    if not path.is_file():
        raise ConfigError("--prompt-version", f"no prompt file {path}")
    raw = read_regular(path, str(path), ConfigError, max_bytes=1 << 20)
    data = parse_yaml(raw, str(path), ConfigError)
    where = path.name
    caption = _field(data, "caption", dict, where)
    judge = _field(data, "judge", dict, where)
    template = _field(judge, "template", str, f"{where}.judge")
    for token in (*MARKERS, "{reference}", "{candidate}"):
        if template.count(token) != 1:
            raise ConfigError(f"{where}.judge.template", f"must hold {token!r} exactly once")
    ref_block = template[template.index(REFERENCE_BEGIN) : template.index(REFERENCE_END)]
    if "{reference}" not in ref_block:
        raise ConfigError(f"{where}.judge.template", "{reference} must sit in its marker block")
    max_tokens = _field(judge, "max_tokens", int, f"{where}.judge")
    if not 1 <= max_tokens <= 4096:
        raise ConfigError(f"{where}.judge.max_tokens", f"must be in 1..4096, got {max_tokens}")
    temps = [
        float(_field(judge, key, (int, float), f"{where}.judge"))
        for key in ("temperature", "retry_temperature")
    ]
    if any(not 0.0 <= t <= 2.0 for t in temps):
        raise ConfigError(f"{where}.judge", f"temperatures must be in [0, 2], got {temps}")
    return JudgePrompt(
        version=_field(data, "version", str, where),
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        caption_prompt=_field(caption, "prompt", str, f"{where}.caption"),
        system=_field(judge, "system", str, f"{where}.judge"),
        template=template,
        max_tokens=max_tokens,
        temperature=temps[0],
        retry_temperature=temps[1],
    )


def _defuse(text: str) -> str:
    """``text`` with the marker brackets broken up, so a caption cannot close its block."""
    return text.replace("<<<", "<< <").replace(">>>", "> >>").strip()


def render_judge(prompt: JudgePrompt, reference: str, candidate: str) -> str:
    """The judge's user message for one caption: the template with both texts put in (one pass,
    so a caption holding ``{reference}`` stays literal text)."""
    texts = {"reference": _defuse(reference), "candidate": _defuse(candidate)}
    return _PLACEHOLDER_RE.sub(lambda m: texts[m.group(1)], prompt.template)


def parse_scores(text: str) -> dict[str, int]:
    """Parses a judge answer strictly.

    Accepted: one JSON object, alone or as the only content of a Markdown code fence
    (```` ```json ... ``` ````), with exactly the keys ``correctness``, ``detail``, ``context``
    and JSON integers 1..5 (not ``4.0``, not ``"4"``, not ``true``).

    Returns:
      ``{"correctness": int, "detail": int, "context": int}`` in :data:`DIMENSIONS` order.

    Raises:
      MalformedScores: saying what is wrong (not JSON, not an object, missing or extra keys,
        a value that is not an integer in range).
    """
    if not isinstance(text, str):
        raise MalformedScores(f"answer is {type(text).__name__}, not text")
    body = text.strip()
    if len(body) > MAX_ANSWER_CHARS:
        raise MalformedScores(f"answer is {len(body)} characters long")
    fence = _FENCE_RE.fullmatch(body)
    if fence is not None:
        body = fence.group(1).strip()
    try:
        data = parse_json(body, "answer", MalformedScores, max_depth=2)
    except MalformedScores as e:
        raise MalformedScores(f"not a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise MalformedScores(f"not a JSON object but a {type(data).__name__}")
    missing = [k for k in DIMENSIONS if k not in data]
    extra = sorted(k for k in data if k not in DIMENSIONS)
    if missing or extra:
        raise MalformedScores(
            f"keys must be exactly {list(DIMENSIONS)}: missing {missing}, extra {brief(extra)}"
        )
    for key in DIMENSIONS:
        value = data[key]
        if type(value) is not int or not SCORE_MIN <= value <= SCORE_MAX:
            raise MalformedScores(
                f"{key!r} must be an integer {SCORE_MIN}-{SCORE_MAX}, not {brief(value)}"
            )
    return {key: data[key] for key in DIMENSIONS}


def chat_checked(
    backend: ChatBackend, requests: list[ChatRequest]
) -> list[ChatReply | BackendError]:
    """``backend.chat(requests)``, refusing an answer list of the wrong length (a backend bug
    that would pair captions with the wrong videos)."""
    replies = backend.chat(requests) if requests else []
    if len(replies) != len(requests):
        raise RuntimeError(
            f"backend {backend.name} answered {len(replies)} replies to {len(requests)} requests"
        )
    return replies


def judge_captions(
    judge: ChatBackend,
    prompt: JudgePrompt,
    items: list[tuple[str, str, str]],
    retries: int,
    seed: int,
) -> list[dict]:
    """Scores captions, retrying malformed answers and failed requests.

    Args:
      items: (key, reference, caption) per caption.
      retries: further attempts after the first; attempt ``a`` uses seed ``seed + a`` (and the
        prompt file's retry temperature from the second attempt on).

    Returns:
      per item ``{"judge_answers": [{"attempt", "text", "model", "error"}...], "scores": dict or
      None, "failure": None or "judge_failed", "failure_detail": the last error}``.
    """
    out = [
        {"judge_answers": [], "scores": None, "failure": None, "failure_detail": None}
        for _ in items
    ]
    pending = list(range(len(items)))
    for attempt in range(retries + 1):
        if not pending:
            break
        temperature = prompt.temperature if attempt == 0 else prompt.retry_temperature
        requests = [
            ChatRequest(
                key=items[i][0],
                prompt=render_judge(prompt, items[i][1], items[i][2]),
                system=prompt.system,
                max_tokens=prompt.max_tokens,
                temperature=temperature,
                seed=seed + attempt,
            )
            for i in pending
        ]
        still = []
        for i, reply in zip(pending, chat_checked(judge, requests), strict=True):
            record = {"attempt": attempt, "text": None, "model": None, "error": None}
            if isinstance(reply, BackendError):
                record["error"] = f"{reply.kind}: {reply.detail}"
            else:
                record.update(text=reply.text, model=reply.model)
                try:
                    out[i]["scores"] = parse_scores(reply.text)
                except MalformedScores as e:
                    record["error"] = f"malformed: {e}"
            out[i]["judge_answers"].append(record)
            if record["error"] is not None:
                still.append(i)
        pending = still
    for i in pending:
        out[i].update(failure="judge_failed", failure_detail=out[i]["judge_answers"][-1]["error"])
    return out


def bootstrap_ci(
    values: np.ndarray, resamples: int, seed: int | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """95 % percentile bootstrap intervals of column means.

    Args:
      values: float [n, k]: n videos, k quantities (the dimensions and the overall); n >= 1.
      resamples: bootstrap resamples (rows drawn with replacement, the same rows for every
        column, so the intervals of one resample belong together).
      seed: ``np.random.default_rng`` seed (an int or a list of ints).

    Returns:
      (low [k], high [k]): the 2.5th and 97.5th percentiles of the resampled means.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"values must be [n >= 1, k], got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, values.shape[0], size=(resamples, values.shape[0]))
    means = values[rows].mean(axis=1)  # [resamples, k]
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    return low, high


def summarize(scores: list[dict[str, int]], resamples: int, seed: int | list[int]) -> dict:
    """Means and 95 % bootstrap intervals of the judged captions at one frame count.

    Args:
      scores: the parsed scores of the judged captions (failed ones are left out by the caller).
      resamples, seed: as :func:`bootstrap_ci`.

    Returns:
      ``{dim: {"mean": m, "ci95": [lo, hi]}}`` for each dimension and ``"overall"`` (per video
      the mean of the three dimensions, then averaged); mean and interval are None when nothing
      was judged.
    """
    names = (*DIMENSIONS, "overall")
    if not scores:
        return {name: {"mean": None, "ci95": None} for name in names}
    table = np.array([[s[d] for d in DIMENSIONS] for s in scores], dtype=np.float64)
    table = np.concatenate([table, table.mean(axis=1, keepdims=True)], axis=1)  # [n, 4]
    low, high = bootstrap_ci(table, resamples, seed)
    means = table.mean(axis=0)
    return {
        name: {"mean": float(means[i]), "ci95": [float(low[i]), float(high[i])]}
        for i, name in enumerate(names)
    }


def format_table(results: dict) -> str:
    """The per-frame-count means with their intervals, one row per frame count."""
    head = f"{'frames':>7} {'judged':>6} {'failed':>6}" + "".join(
        f" {name:>18}" for name in (*DIMENSIONS, "overall")
    )
    lines = [head]
    for row in results["summary"]:
        cells = f"{row['frames']:>7} {row['judged']:>6} "
        cells += f"{row['judge_failed'] + row['caption_failed']:>6}"
        for name in (*DIMENSIONS, "overall"):
            m, ci = row[name]["mean"], row[name]["ci95"]
            text = "-" if m is None else f"{m:.2f} [{ci[0]:.2f},{ci[1]:.2f}]"
            cells += f" {text:>18}"
        lines.append(cells)
    return "\n".join(lines)


__all__ = [
    "DIMENSIONS",
    "PROMPTS_DIR",
    "JudgePrompt",
    "MalformedScores",
    "bootstrap_ci",
    "chat_checked",
    "format_table",
    "judge_captions",
    "load_prompt",
    "parse_scores",
    "render_judge",
    "summarize",
]
