"""Stage 4 of the data engine: the journals become a VILA-format long-video SFT manifest.

Each kept pair of each written video is one record, in the form stage 5's ``video`` kind reads
(``data.samples``: a single human/gpt turn; upstream's long-video records train on their first
turn only, so one pair per record trains every pair):

``{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n" + Q},
{"from": "gpt", "value": A}], "fps", "frame_count", "category", "provenance"}``

``video`` is relative to ``VIDEOS_DIR``, the media root of the data config's ``datasets`` entry
that the summary prints (:func:`dataset_entry`); ``fps`` / ``frame_count`` are the probe's,
which the pipeline trusts over the container (as hints). The summary becomes a ``summary``
record with a question picked by a hash of the video's path from :data:`SUMMARY_QUESTIONS`,
unless the writer already asked that question. ``provenance`` names the clips an answer rests
on (index and time range), the prompt versions with their hashes, the backends and the models
that captioned those clips and wrote the answer. The manifest is written atomically.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Any

from longvila_jax.core.safe_paths import write_atomic
from longvila_jax.longvideo.caption_stage import clip_key
from longvila_jax.longvideo.probe import clips_of
from longvila_jax.longvideo.store import Journal

MANIFEST = "longvideo_sft.jsonl"
SUMMARY_QUESTIONS = (
    "Summarize what happens in this video.",
    "Describe this video from beginning to end.",
    "What happens in this video? Give a summary in order.",
)


def _summary_question(video: str) -> str:
    digest = hashlib.sha256(video.encode()).digest()
    return SUMMARY_QUESTIONS[digest[0] % len(SUMMARY_QUESTIONS)]


def build_records(
    probes: Journal, captions: Journal, written: Journal, provenance: dict[str, Any]
) -> tuple[list[dict[str, Any]], collections.Counter]:
    """The manifest records (module docstring) and the pairs per category.

    Args:
      provenance: what every record shares: ``prompts`` (role -> version and sha256) and
        ``backends`` (role -> backend name).
    """
    records: list[dict[str, Any]] = []
    per_category: collections.Counter[str] = collections.Counter()
    for probe in probes.values():
        out = written.get(probe["key"])
        if probe["status"] != "ok" or out is None or out["status"] != "ok":
            continue
        video = probe["key"]
        clips = clips_of(probe)
        pairs = [dict(qa) for qa in out["qa"]]
        asked = {" ".join(p["question"].lower().split()) for p in pairs}
        question = _summary_question(video)
        if " ".join(question.lower().split()) not in asked:
            every = [c.index for c in clips]
            pairs.insert(
                0,
                {"category": "summary", "question": question, "answer": out["summary"]},
            )
            pairs[0]["clips"] = every
        for k, qa in enumerate(pairs):
            cited = [clips[i] for i in qa["clips"]]
            models = sorted({captions.get(clip_key(video, c.index))["model"] for c in cited})
            records.append(
                {
                    "id": f"{video}#qa{k}",
                    "video": video,
                    "conversations": [
                        {"from": "human", "value": "<video>\n" + qa["question"]},
                        {"from": "gpt", "value": qa["answer"]},
                    ],
                    "fps": probe["info"]["fps"],
                    "frame_count": probe["info"]["frame_count"],
                    "category": qa["category"],
                    "provenance": {
                        "clips": [
                            {"index": c.index, "start_s": c.start_s, "end_s": c.end_s}
                            for c in cited
                        ],
                        "prompts": provenance["prompts"],
                        "backends": provenance["backends"],
                        "models": {"captioner": models, "writer": out["model"]},
                    },
                }
            )
            per_category[qa["category"]] += 1
    return records, per_category


def write_manifest(out_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Writes ``MANIFEST`` into ``out_dir`` atomically; returns its path."""
    path = out_dir / MANIFEST
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    write_atomic(path, body.encode())
    return path


def dataset_entry(manifest: Path, videos_dir: Path) -> dict[str, str]:
    """The ``datasets`` entry of a data config that trains on the manifest (stage 5)."""
    return {
        "name": "longvideo",
        "manifest": str(manifest.resolve()),
        "kind": "video",
        "media_root": str(videos_dir.resolve()),
    }


__all__ = ["MANIFEST", "SUMMARY_QUESTIONS", "build_records", "dataset_entry", "write_manifest"]
