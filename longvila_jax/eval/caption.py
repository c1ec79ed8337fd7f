"""The long-video caption benchmark: ``python -m longvila_jax.eval.caption --model SPEC_OR_DIR
--videos DIR --references REFS.json --judge SPEC --frames 8,32,128 --out OUT_DIR``.

LongVILA reports how its detailed captions of long videos improve as it sees more frames (an
LLM-judged score, 2.00 at 8 frames to 3.26 at 1024). This tool measures that curve for any model
we can run and any judge: for each frame count F the captioner (``backends.spec.open_backend``:
``local:DIR`` or a bare checkpoint folder, ``openai:URL#model``, ``oracle``) describes every video
from F frames spread over its whole length, and the judge scores each caption against the
video's reference on correctness, detail and context, 1-5 each (the Video-ChatGPT rubric,
``eval.caption_judge`` and ``docs/caption_benchmark.md``). A malformed judge answer or a failed
request is retried ``--judge-retries`` times with a new seed, then counted as ``judge_failed``
and left out of the means, never scored 0; every raw answer is kept.

Outputs: ``OUT_DIR/caption_scores.json`` (settings, per video and F the caption, the judge's
answers and the scores or the failure, per F the means with 95 % bootstrap intervals over videos,
the backends' usage) and ``OUT_DIR/caption_scores.png`` (score against frames), both written
atomically, and a table on stdout.

Exit status: 0 ok; 1 bad input (references, videos, a checkpoint: one ``error: ...`` line);
2 a bad argument or config (one ``config error: ...`` line, or argparse's usage message).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from longvila_jax.backends.base import BackendError, ChatBackend, ChatRequest, ClipMedia
from longvila_jax.backends.spec import open_backend, parse_spec
from longvila_jax.core.errors import ConfigError, InputError, brief, brief_path
from longvila_jax.core.safe_load import load_json
from longvila_jax.core.safe_paths import is_regular, prepare_parent, resolve_inside, write_atomic
from longvila_jax.data.clips import ClipReader
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.eval.caption_judge import (
    DIMENSIONS,
    JudgePrompt,
    chat_checked,
    format_table,
    judge_captions,
    load_prompt,
    summarize,
)
from longvila_jax.eval.cli import parse_numbers

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
SCORES_JSON, SCORES_PNG = "caption_scores.json", "caption_scores.png"
_BACKEND_PREFIXES = ("local:", "openai:", "oracle:")


def backend_spec(model: str) -> str:
    """``--model``'s backend spec: a bare checkpoint folder means ``local:DIR``."""
    return model if model == "oracle" or model.startswith(_BACKEND_PREFIXES) else f"local:{model}"


def find_videos(videos_dir: str | os.PathLike) -> list[str]:
    """Video files (by extension) under ``videos_dir``, as sorted relative POSIX paths; links
    are not followed into other folders."""
    root = Path(videos_dir)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if name.lower().endswith(VIDEO_EXTENSIONS) and is_regular(path, root):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def read_references(path: str | os.PathLike, videos_dir: str | os.PathLike) -> dict[str, str]:
    """Reads REFS.json: a JSON object {video path relative to ``videos_dir``: reference caption}.

    Returns:
      {relative video path: caption}, sorted by path; exactly the videos under ``videos_dir``.

    Raises:
      InputError: naming the entry: not an object, an empty or non-string caption, a path that
        escapes ``videos_dir`` or is not a regular file there, two keys for one file, videos
        without a reference.
    """
    if not Path(videos_dir).is_dir():
        raise InputError(f"--videos: {brief_path(videos_dir)} is not a folder")
    data = load_json(path, "--references", InputError, expect=dict)
    root = Path(os.path.abspath(videos_dir))
    refs: dict[str, str] = {}
    for key, caption in data.items():
        what = f"--references entry {brief(key)}"
        video = resolve_inside(root, key, what, InputError)
        if not is_regular(video, root):
            raise InputError(f"{what}: no such video file in {brief_path(videos_dir)}")
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{what}: the reference caption must be a non-empty string")
        rel = video.relative_to(root).as_posix()
        if rel in refs:
            raise InputError(f"{what}: a second reference for {brief(rel)}")
        refs[rel] = caption
    if not refs:
        raise InputError(f"--references: {brief_path(path)} names no video")
    missing = [v for v in find_videos(videos_dir) if v not in refs]
    if missing:
        raise InputError(
            f"--references: {len(missing)} video(s) in {brief_path(videos_dir)} have no "
            f"reference caption: {brief(missing)}"
        )
    return dict(sorted(refs.items()))


def probe_durations(names: list[str], videos_dir: str | os.PathLike, timeout_s: float) -> dict:
    """{name: duration in seconds} from a sandboxed probe of each video.

    Raises:
      InputError: naming a video that cannot be probed (with the skip reason).
    """
    reader = ClipReader(timeout_s)
    try:
        out = {}
        for name in names:
            try:
                out[name] = reader.probe(Path(videos_dir) / name).duration_s
            except SampleSkipped as e:
                raise InputError(f"video {brief(name)}: {e}") from None
        return out
    finally:
        reader.close()


def _record(**fields) -> dict:
    """One video's entry at one frame count, every key present."""
    base = {"caption": None, "caption_model": None, "judge_answers": [], "scores": None}
    return {**base, "overall": None, "failure": None, "failure_detail": None, **fields}


def caption_videos(
    captioner: ChatBackend,
    prompt: JudgePrompt,
    videos: dict[str, tuple[str, float]],
    num_frames: int,
    *,
    max_tokens: int,
    seed: int,
    batch_size: int,
) -> dict[str, dict]:
    """Asks the captioner for a detailed caption of every video from ``num_frames`` frames
    spread over its whole length, ``batch_size`` requests per backend call.

    Returns:
      {name: record} with the caption and its model, or ``failure="caption_failed"``.
    """
    names, records = list(videos), {}
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        requests = [
            ChatRequest(
                key=f"{name}@{num_frames}",
                prompt=prompt.caption_prompt,
                media=ClipMedia(videos[name][0], 0.0, videos[name][1], num_frames),
                max_tokens=max_tokens,
                seed=seed,
            )
            for name in chunk
        ]
        for name, reply in zip(chunk, chat_checked(captioner, requests), strict=True):
            if isinstance(reply, BackendError):
                detail = f"{reply.kind}: {reply.detail}"
                records[name] = _record(failure="caption_failed", failure_detail=detail)
            else:
                records[name] = _record(caption=reply.text, caption_model=reply.model)
    return records


def run_benchmark(
    captioner: ChatBackend,
    judge: ChatBackend,
    prompt: JudgePrompt,
    videos: dict[str, tuple[str, float]],
    references: dict[str, str],
    frames: list[int],
    *,
    seed: int = 0,
    resamples: int = 1000,
    max_tokens: int = 512,
    judge_retries: int = 2,
    batch_size: int = 16,
) -> dict:
    """Captions every video at every frame count, judges the captions, and summarises.

    Args:
      videos: {name: (path, duration in seconds)}; references: {name: reference caption}.
      frames: frame counts, ascending.
      seed: the captioner's seed, the judge's first seed, and the bootstrap's (with F).

    Returns:
      the results (module docstring; written by :func:`write_outputs`).
    """
    t0 = time.perf_counter()
    per_video = {name: {"duration_s": dur, "frames": {}} for name, (_, dur) in videos.items()}
    summary = []
    for n in frames:
        records = caption_videos(
            captioner, prompt, videos, n, max_tokens=max_tokens, seed=seed, batch_size=batch_size
        )
        captioned = [name for name, rec in records.items() if rec["failure"] is None]
        items = [(f"{m}@{n}", references[m], records[m]["caption"]) for m in captioned]
        judged = judge_captions(judge, prompt, items, judge_retries, seed)
        for name, outcome in zip(captioned, judged, strict=True):
            records[name].update(outcome)
            if outcome["scores"] is not None:
                records[name]["overall"] = float(np.mean(list(outcome["scores"].values())))
        for name, rec in records.items():
            per_video[name]["frames"][str(n)] = rec
        failures = [rec["failure"] for rec in records.values()]
        scores = [rec["scores"] for rec in records.values() if rec["scores"] is not None]
        summary.append(
            {
                "frames": n,
                "videos": len(records),
                "judged": len(scores),
                "judge_failed": failures.count("judge_failed"),
                "caption_failed": failures.count("caption_failed"),
                **summarize(scores, resamples, [seed, n]),
            }
        )
    return {
        "benchmark": "caption",
        "settings": {
            "model": captioner.name,
            "judge": judge.name,
            "prompt_version": prompt.version,
            "prompt_file": prompt.path,
            "prompt_sha256": prompt.sha256,
            "frames": list(frames),
            "seed": seed,
            "bootstrap": resamples,
            "max_tokens": max_tokens,
            "judge_retries": judge_retries,
        },
        "summary": summary,
        "videos": per_video,
        "usage": {"captioner": captioner.usage.as_dict(), "judge": judge.usage.as_dict()},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def plot_scores(results: dict, path: str | os.PathLike) -> None:
    """Score against frames (log2 x axis): one line per dimension and the overall, each with
    its 95 % bootstrap interval as a band; written atomically as a PNG."""
    # Imported here: matplotlib is slow to import, and the headless Agg backend must be chosen
    # before pyplot is imported (as eval/report.py does).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    frames = [row["frames"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # Distinct markers and dashes: the oracle judge often gives equal dimensions, and an
    # overall line drawn on top must not hide them.
    styles = {"correctness": ("s", "--"), "detail": ("^", "--"), "context": ("D", ":")}
    for name in (*DIMENSIONS, "overall"):
        marker, dash = styles.get(name, ("o", "-"))
        mean = np.array([np.nan if r[name]["mean"] is None else r[name]["mean"] for r in rows])
        ci = np.array(
            [[np.nan, np.nan] if r[name]["ci95"] is None else r[name]["ci95"] for r in rows]
        )
        width = 2.4 if name == "overall" else 1.4
        (line,) = ax.plot(
            frames, mean, marker=marker, linestyle=dash, linewidth=width, label=name, alpha=0.85
        )
        ax.fill_between(frames, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.set_ylim(0.8, 5.2)
    ax.set_xlabel("Num. of frames")
    ax.set_ylabel("Judge score (1-5)")
    settings = results["settings"]
    ax.set_title(f"Caption score: {settings['model']} (judge {settings['judge']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    """``out_dir/caption_scores.json`` and ``out_dir/caption_scores.png``, atomically."""
    out = Path(out_dir)
    prepare_parent(out / SCORES_JSON, "--out", InputError)
    write_atomic(out / SCORES_JSON, (json.dumps(results, indent=1) + "\n").encode())
    plot_scores(results, out / SCORES_PNG)


def _check_arguments(args: argparse.Namespace) -> None:
    if any(n < 1 for n in args.frames) or len(set(args.frames)) != len(args.frames):
        raise ConfigError("--frames", f"must be distinct positive counts, got {args.frames}")
    for flag, value, low in (
        ("--bootstrap", args.bootstrap, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--judge-retries", args.judge_retries, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise ConfigError(flag, f"must be >= {low}, got {value}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", f"must be >= 1, got {args.limit}")
    for flag, spec in (("--model", backend_spec(args.model)), ("--judge", args.judge)):
        try:
            parse_spec(spec)
        except ValueError as e:
            raise ConfigError(flag, str(e)) from None


def _open(spec: str, role: str, flag: str) -> ChatBackend:
    """``open_backend``, its spec and option errors as ``ConfigError`` naming ``flag`` (a bad
    checkpoint stays an ``InputError``)."""
    try:
        return open_backend(spec, role)
    except InputError:
        raise
    except ValueError as e:
        raise ConfigError(flag, str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m longvila_jax.eval.caption``; returns the exit status (module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m longvila_jax.eval.caption", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True, help="local:DIR | openai:URL#model | oracle | DIR")
    p.add_argument("--videos", required=True, help="folder of the videos")
    p.add_argument("--references", required=True, help="JSON {video path: reference caption}")
    p.add_argument("--judge", required=True, help="openai:URL#model | local:DIR | oracle")
    p.add_argument("--frames", required=True, type=parse_numbers, help="e.g. 8,32,128")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--prompt-version", default="v1", help="configs/eval/prompts/caption_judge_V")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="caption token budget")
    p.add_argument("--judge-retries", type=int, default=2, help="retries of a bad judge answer")
    p.add_argument("--batch-size", type=int, default=16, help="requests per backend call")
    p.add_argument("--probe-timeout", type=float, default=60.0, help="seconds per video probe")
    p.add_argument("--limit", type=int, help="only the first N videos (by path)")
    args = p.parse_args(argv)
    try:
        _check_arguments(args)
        prompt = load_prompt(args.prompt_version)
        refs = read_references(args.references, args.videos)
        if args.limit is not None:
            refs = dict(list(refs.items())[: args.limit])
        durations = probe_durations(list(refs), args.videos, args.probe_timeout)
        videos = {n: (os.path.abspath(Path(args.videos) / n), durations[n]) for n in refs}
        prepare_parent(Path(args.out) / SCORES_JSON, "--out", InputError)
        captioner = _open(backend_spec(args.model), "captioner", "--model")
        try:
            judge = _open(args.judge, "judge", "--judge")
            try:
                results = run_benchmark(
                    captioner,
                    judge,
                    prompt,
                    videos,
                    refs,
                    sorted(args.frames),
                    seed=args.seed,
                    resamples=args.bootstrap,
                    max_tokens=args.max_tokens,
                    judge_retries=args.judge_retries,
                    batch_size=args.batch_size,
                )
            finally:
                judge.close()
        finally:
            captioner.close()
        write_outputs(results, args.out)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    print(f"wrote {Path(args.out) / SCORES_JSON} and {SCORES_PNG} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
