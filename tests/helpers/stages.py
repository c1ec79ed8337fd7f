"""Tiny stage configs shared by the trainer and MM-SP tests, as the plain data a stage YAML holds.

``stage_dict`` is an image + interleaved-document stage on the 2D CPU mesh; ``video_stage_dict``
is the MM-SP tests' video + image stage (8-frame clips, 256-token rows).
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "configs/model/tiny-qwen2.yaml")
MESH = str(REPO / "configs/mesh/cpu8_r2u4.yaml")
VIDEO_DATASETS = [
    {"name": "videos", "manifest": "videos_qa.jsonl", "kind": "video"},
    {"name": "images", "manifest": "images.jsonl", "kind": "image"},
]


def stage_dict(corpus: Path, run_dir: Path, **overrides) -> dict:
    """A tiny image + interleaved-document stage (frames go through the tower); ``overrides``
    replace top-level fields."""
    d = {
        "name": "tiny",
        "model": TINY_MODEL,
        "init_from": "random",
        "trainable": ["projector/.*", "llm/.*"],
        "data": {
            "inline": {
                "root": str(corpus),
                "tokenizer_dir": "tokenizer",
                "datasets": [
                    {"name": "images", "manifest": "images.jsonl", "kind": "image"},
                    {"name": "docs", "manifest": "interleaved.jsonl", "kind": "interleaved"},
                ],
                "image_size": 64,
                "tokens_per_frame": 4,
                "max_frames_per_row": 4,
                "max_segments_per_row": 4,
                "batch_size": 2,
                "decode_timeout_s": 0.0,
                "pad_multiple": 16,
            }
        },
        "seq_len": 128,
        "steps": 6,
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "mesh": MESH,
        "run_dir": str(run_dir),
        "tensorboard": False,
    }
    d.update(overrides)
    return d


def video_stage_dict(corpus: Path, run_dir: Path, inline: dict, **overrides) -> dict:
    """8-frame videos and images in 256-token rows; ``inline`` updates the data section (frames
    per row, batch size, ``sp_degree``), ``overrides`` the top-level fields."""
    d = stage_dict(corpus, run_dir, **{"seq_len": 256, "frames": 8, **overrides})
    d["data"]["inline"].update(datasets=VIDEO_DATASETS, num_video_frames=8, **inline)
    return d


def write_stage(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
