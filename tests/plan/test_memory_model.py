"""The planner's memory model against the compiler: the real MM-SP train step (``plan.witness``:
``train.step`` over ``train.state`` with the trainer's shardings and donation) is lowered and
compiled for abstract inputs on 8 simulated CPU devices, and ``memory_analysis()``'s argument +
temp bytes must lie within 15% of ``plan.memory.memory_breakdown`` (XLA block kernels).

Four shapes over four meshes (ring x ulysses, pure Ulysses with data parallelism, FSDP x 2D), the
four remat policies, 1024-2048 tokens, 0-16 frames, one and two micro-batches. The model's few
coefficients were fitted on 20 compiled steps that include three of these (bench/RESULTS.md,
issue 15); the second case is outside the fit. A small Qwen2-style LLM (hidden 128, 4 layers)
keeps each compile to seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.parallel.mesh import MeshConfig
from longvila_jax.plan.memory import MemoryInputs, memory_breakdown
from longvila_jax.plan.witness import compile_step, compiled_bytes
from longvila_jax.train.state import ModelTemplate

TOLERANCE = 0.15
# (remat, mesh sizes, seq_len, frames, global rows per micro-batch, grad_accum)
CASES = [
    ("nothing_saveable", {"ring": 4, "ulysses": 2}, 1024, 8, 1, 1),
    ("none", {"ring": 2, "ulysses": 4}, 2048, 16, 1, 1),
    ("save_attention", {"data": 2, "ring": 1, "ulysses": 4}, 1024, 4, 2, 2),
    ("dots_with_no_batch_dims_saveable", {"fsdp": 2, "ring": 2, "ulysses": 2}, 2048, 0, 2, 1),
]


def small_model(remat: str) -> ModelConfig:
    tiny = load_config(ModelConfig, "configs/model/tiny-qwen2.yaml")
    llm = dataclasses.replace(
        tiny.llm,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    )
    return dataclasses.replace(tiny, llm=llm, remat=remat)


def predicted(model: ModelConfig, sizes: dict, seq_len: int, frames: int, rows: int, accum: int):
    shards = sizes.get("fsdp", 1)
    total = sum(math.prod(s.shape) for s in ModelTemplate.build(model).shapes.values())
    groups = sizes.get("data", 1) * shards
    inputs = MemoryInputs(
        trainable=total / shards,  # every parameter trains; fsdp splits (nearly) all of them
        frozen=0,
        total_params=total,
        frozen_bytes=4,
        compute_bytes=4,
        fsdp=shards,
        ring=sizes["ring"],
        ulysses=sizes["ulysses"],
        rows=rows // groups,
        seq_len=seq_len,
        frames=frames,
        grad_accum=accum,
        remat=model.remat,
        block_kernel="xla",
    )
    return memory_breakdown(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1].values()))}")
def test_memory_model_within_15_percent_of_compiler(case):
    remat, sizes, seq_len, frames, rows, accum = case
    model = small_model(remat)
    compiled = compile_step(
        model, MeshConfig(**sizes), seq_len=seq_len, frames=frames, rows=rows, grad_accum=accum
    )
    actual = compiled_bytes(compiled)["total"]
    model_bytes = predicted(model, sizes, seq_len, frames, rows, accum)
    error = model_bytes["total"] / actual - 1
    print(
        f"{case}: compiler {actual / 2**20:.2f} MiB, model {model_bytes['total'] / 2**20:.2f} "
        f"MiB, error {error:+.3f}"
    )
    assert abs(error) <= TOLERANCE, (error, model_bytes, compiled_bytes(compiled))
