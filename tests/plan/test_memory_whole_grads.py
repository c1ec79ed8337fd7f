"""The memory model's whole-gradient term: trainable parameters that no sharding rule splits
(a dimension the shard count does not divide) keep whole fp32 gradients in the backward when
the other parameters are sharded. The 256-device Qwen2-7B witness (``bench/scale_witness.py``,
bench/RESULTS.md) showed the term: SigLIP-384's 1152-wide tensors cannot be split 256 ways.
Analytic only: nothing is compiled."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.plan.memory import WHOLE_GRAD_COPIES, MemoryInputs, memory_breakdown
from longvila_jax.plan.search import Candidate
from longvila_jax.plan.workload import Workload
from longvila_jax.train.state import ModelTemplate

ROOT = Path(__file__).resolve().parents[2]


def _inputs(fsdp: int, whole: float) -> MemoryInputs:
    # A long row and few parameters: the backward phase, not the update phase, is the larger.
    return MemoryInputs(
        trainable=1e6, frozen=0, total_params=fsdp * 1e6, frozen_bytes=2, compute_bytes=2,
        fsdp=fsdp, ring=2, ulysses=2, rows=1, seq_len=8192, frames=8, grad_accum=1,
        remat="nothing_saveable", block_kernel="pallas", whole_trainable=whole,
    )  # fmt: skip


def test_whole_gradients_are_added_to_the_backward_phase_under_parameter_sharding():
    model = load_config(ModelConfig, ROOT / "configs/model/tiny-qwen2.yaml")
    without = memory_breakdown(model, _inputs(4, 0.0))
    with_whole = memory_breakdown(model, _inputs(4, 5e5))
    assert without["whole_grads"] == 0.0
    assert with_whole["whole_grads"] == WHOLE_GRAD_COPIES * 4 * 5e5 == 4e6
    assert with_whole["total"] - without["total"] == 4e6
    # Nothing is sharded: the update phase's copies already hold the gradients (8-device fit).
    replicated = memory_breakdown(model, _inputs(1, 5e5))
    assert replicated["whole_grads"] == 0.0
    assert replicated["total"] == memory_breakdown(model, _inputs(1, 0.0))["total"]


def test_siglip_stays_whole_when_zero_shards_qwen2_7b_over_256_devices():
    model = load_config(ModelConfig, ROOT / "configs/model/qwen2-7b-longvila-384.yaml")
    work = Workload.custom(model, seq_len=2_097_152, frames=10_645, global_rows=1)
    zero = Candidate(1, 1, 256, 1, "nothing_saveable", zero_sp=True)
    params = work.params(zero.sizes, zero.param_rules())
    shapes = ModelTemplate.build(model).shapes
    vision = sum(math.prod(s.shape) for n, s in shapes.items() if n.startswith("vision/"))
    projector = sum(math.prod(s.shape) for n, s in shapes.items() if n.startswith("projector/"))
    # Every SigLIP tensor has a 1152 / 4304 / 14 dimension (none divides 256); the LLM's
    # 3584 / 18944 / 512-wide tensors all split, so only tower and projector parts stay whole.
    assert vision <= params.whole_trainable < vision + projector
    # Per device: the whole part plus the LLM's 256th (its 7.6B split exactly).
    llm = sum(math.prod(s.shape) for n, s in shapes.items() if n.startswith("llm/"))
    assert abs(params.trainable - params.whole_trainable - llm / 256) < projector / 256 + 1
    # Two pure-data-parallel devices shard nothing: every parameter is whole.
    dp = Candidate(2, 1, 1, 1, "nothing_saveable")
    assert work.params(dp.sizes, dp.param_rules()).whole_trainable == params.trainable_total


def test_the_planner_counts_whole_gradients_for_the_2m_token_plan():
    model = load_config(ModelConfig, ROOT / "configs/model/qwen2-7b-longvila-384.yaml")
    model = dataclasses.replace(model, compute_dtype="bfloat16", remat="nothing_saveable")
    work = Workload.custom(model, seq_len=2_097_152, frames=10_645, global_rows=1)
    zero = Candidate(1, 1, 256, 1, "nothing_saveable", zero_sp=True)
    params = work.params(zero.sizes, zero.param_rules())
    base = dict(
        trainable=params.trainable, frozen=params.frozen, total_params=params.total,
        frozen_bytes=2, compute_bytes=2, fsdp=zero.param_shards, ring=256, ulysses=1, rows=1,
        seq_len=2_097_152, frames=10_645, grad_accum=1, remat="nothing_saveable",
        block_kernel="pallas",
    )  # fmt: skip
    got = memory_breakdown(model, MemoryInputs(**base, whole_trainable=params.whole_trainable))
    # 2 x 4 bytes x 414.6M whole SigLIP / projector parameters: the witness's 3.1 GiB constant.
    assert 3.0 < got["whole_grads"] / 2**30 < 3.2
