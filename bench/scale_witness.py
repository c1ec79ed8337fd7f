"""The compiler as witness of the 256-GPU plan: the real Qwen2-7B MM-SP step at full depth.

The planner's choice for the 2M-token stage-5 step on 32 x 8 H100s (``plan.search``) is lowered
and compiled on 256 simulated CPU devices with ``ShapeDtypeStruct`` arguments
(``plan.witness.compile_step``: nothing is allocated). The layer scans make depth free to
compile, so the model is the real one (28 LLM layers, 27 SigLIP-384 layers, width 3584, 28/4
heads, vocabulary 151,648); only the row is shorter than 2M tokens. Each row's
``memory_analysis()`` (argument + temp per device) is compared with ``plan.memory`` for the same
shape (XLA block kernels, as compiled).

Extrapolation to the full row: the compiler's figure is fitted as the planner's own terms plus
two coefficients, ``compiler(L) = pallas(L) + k0 + k1 * (xla(L) - pallas(L))``, where
``pallas(L)`` is the planner's total with a fused kernel (no score temporaries) and
``xla(L) - pallas(L)`` its XLA:CPU score-buffer term: ``k0`` is what the planner misses at this
shape, ``k1`` how many of its score buffers XLA:CPU really keeps at R = 256. The fit error is
given in sample and leave-one-out (each row predicted from the others); the full-row figure of
the GPU path is ``pallas(2M) + k0`` (score buffers do not exist in the fused kernel).

Usage:
  python bench/scale_witness.py [--layers 28] [--seq 16384,32768,65536,131072]
  python bench/scale_witness.py --refit     # refit the rows of the JSON, no compiles
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

import numpy as np  # noqa: E402

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


def model_bytes(
    work: Workload, c: Candidate, model: ModelConfig, seq: int, frames: int, kernel: str = "xla"
) -> float:
    """The planner's per-device total for one row of ``seq`` tokens with ``kernel`` blocks."""
    params = dataclasses.replace(work, model=model).params(c.sizes, c.param_rules())
    inputs = MemoryInputs(
        trainable=params.trainable, frozen=params.frozen, total_params=params.total,
        frozen_bytes=2, compute_bytes=2, fsdp=c.param_shards, ring=c.ring, ulysses=c.ulysses,
        rows=1, seq_len=seq, frames=frames, grad_accum=1, remat=c.remat, block_kernel=kernel,
        whole_trainable=params.whole_trainable,
    )  # fmt: skip
    return memory_breakdown(model, inputs)["total"]


def _coefficients(rows: list[dict], keep: list[int]) -> np.ndarray:
    """Least-squares (k0, k1) of ``total = pallas + k0 + k1 * (xla - pallas)`` on ``keep``."""
    a = np.asarray([[1.0, rows[i]["model"] - rows[i]["model_pallas"]] for i in keep])
    b = np.asarray([rows[i]["total"] - rows[i]["model_pallas"] for i in keep])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def extrapolate(rows: list[dict], full_pallas: float) -> dict:
    """The fit of the module docstring over ``rows`` (one layer count, >= 3 lengths), its
    in-sample and leave-one-out errors, and the full row's figure for the fused kernel."""
    if len(rows) < 3:
        raise SystemExit("the extrapolation needs at least three row lengths")

    def predict_row(r: dict, k: np.ndarray) -> float:
        return r["model_pallas"] + k[0] + k[1] * (r["model"] - r["model_pallas"])

    k = _coefficients(rows, list(range(len(rows))))
    loo, loo_k0 = [], []
    for i, r in enumerate(rows):
        ki = _coefficients(rows, [j for j in range(len(rows)) if j != i])
        loo.append(predict_row(r, ki) / r["total"] - 1)
        loo_k0.append(float(ki[0]))
    return {
        "form": "compiler = pallas + k0 + k1 * (xla - pallas)",
        "k0_bytes": float(k[0]),
        "k1": float(k[1]),
        "in_sample_error": [predict_row(r, k) / r["total"] - 1 for r in rows],
        "leave_one_out_error": loo,
        "full_seq": FULL_SEQ,
        "planner_pallas_bytes": full_pallas,
        "extrapolated_bytes": full_pallas + float(k[0]),
        "extrapolated_bytes_range": [full_pallas + min(loo_k0), full_pallas + max(loo_k0)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="28")
    ap.add_argument("--seq", default="16384,32768,65536,131072")
    ap.add_argument("--refit", action="store_true", help="refit the JSON's rows, no compiles")
    args = ap.parse_args()
    path = ROOT / "bench/results/scale_witness.json"
    base = load_config(ModelConfig, MODEL)
    base = dataclasses.replace(base, compute_dtype="bfloat16", remat="nothing_saveable")
    work, plan = chosen_plan(base)
    c = plan.candidate
    print(
        f"plan: ring {c.ring} x ulysses {c.ulysses}, zero_sp {c.zero_sp}, "
        f"{plan.memory['total'] / 2**30:.1f} GiB predicted (Pallas kernels)",
        flush=True,
    )
    rows = json.loads(path.read_text())["rows"] if args.refit else []
    if not args.refit:
        for layers in (int(x) for x in args.layers.split(",")):
            for seq in (int(x) for x in args.seq.split(",")):
                model = scaled_model(base, layers=layers)
                t0 = time.time()
                compiled = compile_step(
                    model, c.mesh_config(), seq_len=seq, frames=seq // POSITIONS_PER_FRAME, rows=1
                )
                rows.append(
                    {
                        "layers": layers,
                        "seq": seq,
                        "frames": seq // POSITIONS_PER_FRAME,
                        **compiled_bytes(compiled),
                        "compile_s": time.time() - t0,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # re-scored with the current plan.memory (also on --refit)
        model = scaled_model(base, layers=r["layers"])
        for key, kernel in (("model", "xla"), ("model_pallas", "pallas")):
            r[key] = model_bytes(work, c, model, r["seq"], r["frames"], kernel)
        r["error"] = r["model"] / r["total"] - 1
    print("| layers | tokens | compiler GiB | planner GiB (XLA) | error | planner GiB (Pallas) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['seq']:,} | {r['total'] / 2**30:.2f} | "
            f"{r['model'] / 2**30:.2f} | {r['error']:+.1%} | {r['model_pallas'] / 2**30:.2f} |"
        )
    out: dict = {"plan": plan.row(), "rows": rows, "fits": {}}
    full = base.llm.num_hidden_layers
    deep = [r for r in rows if r["layers"] == full]
    if len(deep) >= 3:
        fit = extrapolate(deep, plan.memory["total"])
        out["fits"][str(full)] = fit
        print(
            f"fit {fit['form']}: k0 {fit['k0_bytes'] / 2**30:.2f} GiB, k1 {fit['k1']:.2f}; "
            "in-sample "
            + ", ".join(f"{e:+.1%}" for e in fit["in_sample_error"])
            + "; leave-one-out "
            + ", ".join(f"{e:+.1%}" for e in fit["leave_one_out_error"])
        )
        lo, hi = fit["extrapolated_bytes_range"]
        print(
            f"{FULL_SEQ:,} tokens, fused kernel: planner {fit['planner_pallas_bytes'] / 2**30:.1f}"
            f" GiB, extrapolated from the compiler {fit['extrapolated_bytes'] / 2**30:.1f} GiB "
            f"(leave-one-out {lo / 2**30:.1f}-{hi / 2**30:.1f})"
        )
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
