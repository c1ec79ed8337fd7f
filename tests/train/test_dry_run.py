"""The recipe dry run (``python -m longvila_jax.train --config S.yaml --dry-run``) on every real
stage: each fits its length and reaches upstream's samples per step at upstream's lr, stage 4
trains no embeddings, and a few reported numbers equal values computed here by hand from the
YAML and the model dims. Nothing is compiled and no device array is created.

Tolerance on samples per step: upstream's figure is per-device x DP x grad-acc with DP = 8 n_node
/ SP, fractional for stage 5 (2 x 1024 / 14 = 146.29). A port feeds whole rows of whole samples,
so the best it can do is the nearest whole number: |ours - upstream| <= 0.5, and exact equality
when upstream's figure is whole (stages 1-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
import yaml

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.train.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
REAL = sorted(p for p in (ROOT / "configs/stages").glob("s*.yaml"))


def _dry_run(capsys, path: Path, *extra: str) -> tuple[int, dict | None, str]:
    rc = main(["--config", str(path), "--dry-run", *extra])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_every_real_stage_is_covered():
    names = {p.stem for p in REAL}
    assert len(REAL) == 11 and not any(n.startswith("demo") for n in names)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_stage_plan_matches_upstream(path, capsys, compile_events):
    raw = yaml.safe_load(path.read_text())
    arrays_before = len(jax.live_arrays())
    compiles_before = len(compile_events)
    rc, r, err = _dry_run(capsys, path)
    assert rc == 0, err
    assert len(compile_events) == compiles_before, "the dry run compiled something"
    assert len(jax.live_arrays()) == arrays_before, "the dry run created device arrays"
    up = raw["upstream"]
    assert r["fits"] and r["max_sample_positions"] <= r["seq_len"] == raw["seq_len"]
    tolerance = 0.5 if up["samples_per_step"] != int(up["samples_per_step"]) else 0
    assert abs(r["global_batch_samples"] - up["samples_per_step"]) <= tolerance, r
    assert r["lr"] == float(up["lr"]) == float(raw["optim"]["lr"])
    assert r["grad_accum"] == raw["optim"]["grad_accum"] and r["steps"] == raw["steps"]
    assert "seq_len" in err and "global_batch_samples" in err  # the table on stderr
    # Upstream's master/moment dtypes (DeepSpeed bf16 + ZeRO): fp32 masters and moments.
    assert r["precision"] == {
        "params": "float32",
        "compute": "bfloat16",
        "optimizer_state": "float32",
        "frozen": "bfloat16",
    }


def _dims(model_yaml: str) -> ModelConfig:
    return load_config(ModelConfig, ROOT / model_yaml)


@pytest.mark.parametrize("rung", ["64k", "256k", "512k", "1m"])
def test_stage4_trains_norms_and_lora_not_embeddings(rung, capsys):
    path = ROOT / f"configs/stages/s4_extend_{rung}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert not any("embed" in pat for pat in raw["trainable"])
    rc, r, _ = _dry_run(capsys, path)
    assert rc == 0
    llm = _dims(raw["model"]).llm
    h, layers, rank = llm.hidden_size, llm.num_hidden_layers, raw["lora"]["rank"]
    kv = llm.num_key_value_heads * (h // llm.num_attention_heads)
    norms = layers * 2 * h + h  # input + post-attention RMSNorm per layer, final norm
    # LoRA A [in, r] + B [r, out] on q (h->h), k (h->kv), v (h->kv), o (h->h) of every layer.
    lora = layers * rank * ((h + h) + (h + kv) + (h + kv) + (h + h))
    assert r["lora_params"] == lora
    assert r["trainable_params"] == norms + lora  # no embed_tokens (151,648 x 3,584) in it
    # fsdp = 1: nothing sharded; masters + two moments in fp32.
    assert r["mesh"]["fsdp"] == r["mesh"]["data"] == 1
    assert r["bytes_per_device"]["optimizer"] == 2 * (norms + lora) * 4


def test_stage1_numbers_by_hand(capsys):
    path = ROOT / "configs/stages/s1_align.yaml"
    raw = yaml.safe_load(path.read_text())
    rc, r, _ = _dry_run(capsys, path)
    assert rc == 0
    cfg = _dims(raw["model"])
    v, h = cfg.vision.hidden_size, cfg.llm.hidden_size
    # mlp_downsample: LayerNorm(4 v) -> Linear(4 v, h) -> GELU -> Linear(h, h), 2x2 merge.
    projector = 2 * 4 * v + (4 * v * h + h) + (h * h + h)
    assert r["trainable_params"] == projector == 29_376_512
    data = raw["data"]["inline"]
    assert r["global_batch_samples"] == data["batch_size"] == 2048  # one sample per row
    assert r["tokens_per_step"] == r["global_batch_samples"] * raw["seq_len"]
    # One image: 256 visual tokens + "\n" per frame, text up to max_text_tokens - 2 ids.
    assert r["positions_per_frame"] == 257 and r["max_frames"] == 1
    assert r["max_sample_positions"] == 257 + (data["max_text_tokens"] - 2)
    # Frozen LLM + tower in bf16, trainable projector master + 2 moments in fp32: the
    # projector's kernels split over fsdp 8 along their LLM-width (embed) dims.
    assert r["bytes_per_device"]["optimizer"] < 2 * projector * 4


def test_stage5_1024f_numbers_by_hand(capsys):
    path = ROOT / "configs/stages/s5_long_sft_1024f.yaml"
    rc, r, _ = _dry_run(capsys, path)
    assert rc == 0
    # siglip-384 + mlp_downsample: 27 x 27 patches -> 14 x 14 = 196 tokens, + "\n".
    assert r["positions_per_frame"] == 197 and r["max_frames"] == 1024
    assert r["max_sample_positions"] == 1024 * 197 + (6144 - 2 * 1024) == 205_824
    assert r["global_batch_samples"] == round(1 * 1024 / 28) == 37
    assert r["tokens_per_step"] == 37 * 262_144
    assert r["steps"] == -(-6 * 10_000 // 37)  # 6 epochs of the assumed 10,000 samples
    # Everything trains, DP = 1 (no fsdp sharding): fp32 master + two fp32 moments per param.
    n = r["trainable_params"]
    assert r["frozen_params"] == 0
    assert r["bytes_per_device"] == {"params": 4 * n, "optimizer": 8 * n, "total": 12 * n}


def test_the_448_tower_at_1024_frames_does_not_fit(capsys):
    """The audit's case: 1024 frames x 257 positions cannot fit 262,144 (exit 1, fits false)."""
    path = ROOT / "configs/stages/s5_long_sft_1024f.yaml"
    sets = (
        "[num_video_frames=1024, max_frames_per_row=1024, sp_degree=1, image_size=448, "
        "tokens_per_frame=256, max_text_tokens=6144, max_segments_per_row=1, batch_size=37]"
    )
    rc, r, err = _dry_run(
        capsys,
        path,
        "--set",
        "model=configs/model/qwen2-7b-longvila-256f.yaml",
        "--set",
        f"data.set={sets}",
    )
    assert rc == 1 and r is not None and r["fits"] is False
    assert r["max_sample_positions"] == 6144 + 1024 * 255 > r["seq_len"] == 262_144
    assert "error:" in err and "seq_len" in err


def test_dry_run_still_rejects_a_bad_config(capsys):
    path = ROOT / "configs/stages/s5_long_sft_256f.yaml"
    rc, r, err = _dry_run(capsys, path, "--set", "optim.grad_accum=5")
    assert rc == 2 and r is None and "optim.grad_accum" in err


def test_a_fill_axis_needs_a_device_count(capsys):
    path = ROOT / "configs/stages/s1_align.yaml"
    rc, r, err = _dry_run(capsys, path, "--set", "mesh_set=[ulysses=1, fsdp=-1]")
    assert rc == 2 and r is None and "mesh" in err and "--devices" in err
    rc, r, _ = _dry_run(capsys, path, "--set", "mesh_set=[ulysses=1, fsdp=-1]", "--devices", "16")
    # Two 8-device hosts; fsdp is a batch axis, so each host holds 8 of the 16 batch groups and
    # reads its own 2048 rows: 2 data shards.
    assert rc == 0 and r["mesh"]["fsdp"] == 16 and r["processes"] == 2
    assert r["global_batch_samples"] == 2 * 2048
