"""The data engine's run: probe and split, caption clips, write instructions, validate and emit.

:func:`build` runs the four stages in order over ``VIDEOS_DIR`` into ``OUT_DIR``:

- ``OUT_DIR/work/{probe,caption,write}.jsonl``: the stages' journals (``longvideo.store``); a
  rerun skips what they hold, and ``run.json`` keeps each stage's settings so a rerun with
  other settings stops instead of mixing results (``restart_from`` redoes a stage and the
  later ones);
- ``OUT_DIR/longvideo_sft.jsonl``: the manifest (``longvideo.emit``), rebuilt from the
  journals on every run;
- ``OUT_DIR/summary.json``: videos, clips, captions, QA per category, skips per reason,
  failures per backend error kind, tokens spent per backend, wall time, and the data config
  ``datasets`` entry that trains on the manifest.

``limit`` takes the first N videos in sorted order (a trial run; a later run without it goes on
from there).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from longvila_jax.backends.base import ChatBackend
from longvila_jax.core.safe_paths import write_atomic
from longvila_jax.data.clips import ClipReader
from longvila_jax.longvideo.caption_stage import run_captions
from longvila_jax.longvideo.emit import build_records, dataset_entry, write_manifest
from longvila_jax.longvideo.probe import ClipSettings, find_videos, run_probe
from longvila_jax.longvideo.prompts import Prompt
from longvila_jax.longvideo.store import Journal, check_run_settings
from longvila_jax.longvideo.write_stage import run_writer


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything a run depends on besides the backends themselves.

    Attributes:
      clips: how videos are cut.
      frames_per_clip: frames the captioner sees per clip.
      caption_batch, writer_batch: requests handed to a backend at once.
      writer_retries: new attempts after an invalid writer answer.
      probe_timeout_s: seconds a probe may take before the video is skipped.
      limit: process only the first N videos (None: all).
      restart_from: redo this stage (``probe``, ``caption``, ``write``) and the later ones.
      progress: show a progress bar per stage.
    """

    clips: ClipSettings = ClipSettings()
    frames_per_clip: int = 8
    caption_batch: int = 8
    writer_batch: int = 4
    writer_retries: int = 2
    probe_timeout_s: float = 60.0
    limit: int | None = None
    restart_from: str | None = None
    progress: bool = True


def _stage_settings(
    settings: BuildSettings, backends: dict[str, ChatBackend], prompts: dict[str, Prompt]
) -> dict[str, dict[str, Any]]:
    return {
        "probe": dataclasses.asdict(settings.clips),
        "caption": {
            "backend": backends["captioner"].name,
            "prompt": prompts["captioner"].provenance(),
            "frames_per_clip": settings.frames_per_clip,
        },
        "write": {
            "backend": backends["writer"].name,
            "prompt": prompts["writer"].provenance(),
            "retries": settings.writer_retries,
        },
    }


def build(
    videos_dir: Path,
    out_dir: Path,
    backends: dict[str, ChatBackend],
    prompts: dict[str, Prompt],
    settings: BuildSettings = BuildSettings(),
) -> dict[str, Any]:
    """Runs the engine (module docstring) and returns the summary it writes.

    Args:
      videos_dir: the long videos (searched recursively).
      out_dir: journals, manifest and summary (created).
      backends: ``captioner`` and ``writer`` (``backends.spec.open_backend``); not closed here.
      prompts: ``captioner`` and ``writer`` prompts (``longvideo.prompts.load_prompt``).

    Raises:
      InputError: a bad videos folder, a damaged journal, or settings that differ from those
        the journals were made with.
    """
    t0 = time.perf_counter()
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    work = out_dir / "work"
    check_run_settings(work, _stage_settings(settings, backends, prompts), settings.restart_from)
    videos, passed = find_videos(videos_dir)
    if settings.limit is not None:
        videos = videos[: settings.limit]
    probes = Journal(work / "probe.jsonl")
    reader = ClipReader(settings.probe_timeout_s)
    try:
        run_probe(videos_dir, videos, probes, settings.clips, reader, settings.progress)
    finally:
        reader.close()
    chosen = set(videos)
    probes.records = {k: v for k, v in probes.records.items() if k in chosen}
    captions = Journal(work / "caption.jsonl")
    cap = run_captions(
        videos_dir,
        probes,
        captions,
        backends["captioner"],
        prompts["captioner"],
        settings.frames_per_clip,
        settings.caption_batch,
        settings.progress,
    )
    written = Journal(work / "write.jsonl")
    wr = run_writer(
        probes,
        captions,
        written,
        backends["writer"],
        prompts["writer"],
        settings.writer_retries,
        settings.writer_batch,
        settings.progress,
    )
    provenance = {
        "prompts": {role: p.provenance() for role, p in prompts.items()},
        "backends": {role: b.name for role, b in backends.items()},
    }
    records, per_category = build_records(probes, captions, written, provenance)
    manifest = write_manifest(out_dir, records)

    skips: collections.Counter[str] = collections.Counter(passed)
    qa_dropped: collections.Counter[str] = collections.Counter()
    ok = [r for r in probes.values() if r["status"] == "ok"]
    for rec in probes.values():
        if rec["status"] == "skipped":
            skips[rec["reason"]] += 1
    for rec in written.values():
        if rec["key"] not in chosen:
            continue
        if rec["status"] == "dropped":
            skips[f"writer:{rec['reason']}"] += 1
        else:
            qa_dropped.update(rec["dropped_qa"])
    if wr.waiting:
        skips["missing_captions"] += wr.waiting
    n_clips = sum(len(r["clips"]) for r in ok)
    keys = {f"{r['key']}#{k}" for r in ok for k in range(len(r["clips"]))}
    summary = {
        "videos": {
            "found": len(videos) + sum(passed.values()),
            "probed_ok": len(ok),
            "written": sum(
                1 for r in written.values() if r["status"] == "ok" and r["key"] in chosen
            ),
        },
        "clips": n_clips,
        "captions": {
            "total": sum(1 for k in keys if k in captions),
            "made_this_run": cap.made,
            "failed_this_run": dict(cap.failed),
        },
        "writer": {
            "written_this_run": wr.written,
            "dropped_this_run": wr.dropped_videos,
            "bad_answers_this_run": dict(wr.bad_answers),
            "failed_this_run": dict(wr.failed),
        },
        "qa": dict(sorted(per_category.items())),
        "qa_dropped": dict(sorted(qa_dropped.items())),
        "records": len(records),
        "skips": dict(sorted(skips.items())),
        "backends": {role: {"name": b.name, **b.usage.as_dict()} for role, b in backends.items()},
        "wall_s": round(time.perf_counter() - t0, 3),
        "manifest": str(manifest),
        "dataset": dataset_entry(manifest, videos_dir),
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


__all__ = ["BuildSettings", "build"]
