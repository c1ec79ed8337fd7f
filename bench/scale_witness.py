"""The compiler as witness of the 256-GPU plan: the real Qwen2-7B MM-SP step, scaled down.

The planner's choice for the 2M-token stage-5 step on 32 x 8 H100s (``plan.search``) is lowered
and compiled on 256 simulated CPU devices with ``ShapeDtypeStruct`` arguments
(``plan.witness.compile_step``: nothing is allocated). The full step does not compile on this
host, so the LLM keeps its full width (3584, 28/4 heads, vocab 151,648) with fewer layers and a
shorter row; each size's ``memory_analysis()`` (argument + temp per device) is compared with
``plan.memory`` for the same shape (XLA block kernels, as compiled), and the bytes per token of
both (a line through the two lengths of each layer count) are printed. No extrapolation to the
full shape is made: XLA:CPU's score buffers are not what a GPU's fused kernel keeps.

Usage:
  python bench/scale_witness.py [--layers 1,2] [--seq 16384,32768]
Writes bench/results/scale_witness.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=256 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from longvila_jax.config.base import load_config  # noqa: E402
from longvila_jax.config.model import ModelConfig  # noqa: E402
from longvila_jax.plan.hardware import make_cluster  # noqa: E402
from longvila_jax.plan.memory import MemoryInputs, memory_breakdown  # noqa: E402
from longvila_jax.plan.search import Candidate, predict  # noqa: E402
from longvila_jax.plan.witness import compile_step, compiled_bytes, scaled_model  # noqa: E402
from longvila_jax.plan.workload import Workload  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "configs/model/qwen2-7b-longvila-384.yaml"
FULL_SEQ = 2_097_152
POSITIONS_PER_FRAME = 197


def chosen_plan(model: ModelConfig):
    """The planner's fastest valid nothing_saveable 2D mesh for 2M tokens on 32 x 8 H100s."""
    work = Workload.custom(
        model, seq_len=FULL_SEQ, frames=FULL_SEQ // POSITIONS_PER_FRAME, global_rows=1
    )
    cluster = make_cluster("h100-sxm", nodes=32, devices_per_node=8)
    best = None
    for u in (1, 2, 4):
        for zero in (True,):
            c = Candidate(1, 1, 256 // u, u, "nothing_saveable", 1, 1, zero)
            p = predict(work, cluster, c)
            if p.valid and (best is None or p.tokens_per_s > best.tokens_per_s):
                best = p
    return work, best


def model_bytes(work: Workload, c: Candidate, model: ModelConfig, seq: int, frames: int) -> float:
    params = dataclasses.replace(work, model=model).params(c.sizes, c.param_rules())
    inputs = MemoryInputs(
        trainable=params.trainable, frozen=params.frozen, total_params=params.total,
        frozen_bytes=2, compute_bytes=2, fsdp=c.param_shards, ring=c.ring, ulysses=c.ulysses,
        rows=1, seq_len=seq, frames=frames, grad_accum=1, remat=c.remat, block_kernel="xla",
    )  # fmt: skip
    return memory_breakdown(model, inputs)["total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--seq", default="16384,32768")
    args = ap.parse_args()
    base = load_config(ModelConfig, MODEL)
    base = dataclasses.replace(base, compute_dtype="bfloat16", remat="nothing_saveable")
    work, plan = chosen_plan(base)
    c = plan.candidate
    print(
        f"plan: ring {c.ring} x ulysses {c.ulysses}, zero_sp {c.zero_sp}, "
        f"{plan.memory['total'] / 2**30:.1f} GiB predicted (Pallas kernels)",
        flush=True,
    )
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        for seq in (int(x) for x in args.seq.split(",")):
            model = scaled_model(base, layers=layers)
            frames = seq // POSITIONS_PER_FRAME
            t0 = time.time()
            compiled = compile_step(model, c.mesh_config(), seq_len=seq, frames=frames, rows=1)
            got = compiled_bytes(compiled)
            pred = model_bytes(work, c, model, seq, frames)
            row = {
                "layers": layers,
                "seq": seq,
                "frames": frames,
                **got,
                "model": pred,
                "error": pred / got["total"] - 1,
                "compile_s": time.time() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out: dict = {"plan": plan.row(), "rows": rows}
    # Scaling: bytes = a + b * L for each layer count (two lengths give the slope per token).
    fits = {}
    for layers in sorted({r["layers"] for r in rows}):
        pts = [(r["seq"], r["total"], r["model"]) for r in rows if r["layers"] == layers]
        if len(pts) >= 2:
            (l0, c0, m0), (l1, c1, m1) = pts[0], pts[-1]
            fits[layers] = {
                "compiler_bytes_per_token": (c1 - c0) / (l1 - l0),
                "model_bytes_per_token": (m1 - m0) / (l1 - l0),
            }
            print(
                f"layers {layers}: compiler {fits[layers]['compiler_bytes_per_token']:.0f} "
                f"B/token, model {fits[layers]['model_bytes_per_token']:.0f} B/token"
            )
    out["fits"] = fits
    path = ROOT / "bench/results/scale_witness.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
