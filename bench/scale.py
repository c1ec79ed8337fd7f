"""Scaling predictions of the mesh planner for the released 7B/8B LongVILA models on H100s.

Two tables, both from ``longvila_jax.plan`` (analytic; nothing is compiled or run):

1. The longest row (tokens) one optimizer step can hold at 8-256 GPUs (H100 SXM 80 GB, 90% of
   it usable), one row per step (data = fsdp = 1, parameters ZeRO-sharded over the sequence
   axes, as DeepSpeed does upstream), frames at 197 positions each, without remat ("none")
   and with full remat ("nothing_saveable"), beside the paper's 2M tokens on 256 GPUs
   (LongVILA, arXiv 2408.10188: "2M context ... 256 GPUs without gradient checkpointing").
2. Step time at the same GPU counts and 2K or 8K tokens per GPU: 2D MM-SP (the planner's best
   U x R), ring-only (U = 1), Ulysses-only (R = 1; across nodes its all-to-all runs at the
   InfiniBand bandwidth) and a Megatron-style context parallel x tensor parallel plan (TP
   inside the node, CP ring across: two all-reduces of activations per layer forward and two
   backward, ``plan.comm.tp_bytes``), beside the paper's 2.1-5.7x over ring-style SP and
   1.1-1.4x over Megatron CP+TP.

Usage:
  python bench/scale.py [--preset h100-sxm]
Writes bench/results/scale.json and prints the markdown tables (appended to bench/RESULTS.md by
hand, under a dated heading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.plan import comm
from longvila_jax.plan.flops import REMAT_EXTRA, step_flops
from longvila_jax.plan.hardware import GIB, make_cluster
from longvila_jax.plan.memory import MemoryInputs, memory_breakdown
from longvila_jax.plan.search import Candidate, predict
from longvila_jax.plan.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = {
    "Qwen2-7B (qwen2-7b-longvila-384)": "configs/model/qwen2-7b-longvila-384.yaml",
    "Llama-3-8B (llama3-longvila-8b)": "configs/model/llama3-longvila-8b.yaml",
}
GPUS = (8, 32, 64, 128, 256)
POSITIONS_PER_FRAME = 197
TOKENS_PER_GPU = (2048, 8192)


def workload(model: ModelConfig, seq_len: int) -> Workload:
    """One row of ``seq_len`` tokens per step, video frames filling it (bf16 compute)."""
    model = dataclasses.replace(model, compute_dtype="bfloat16")
    return Workload.custom(
        model, seq_len=seq_len, frames=seq_len // POSITIONS_PER_FRAME, global_rows=1
    )


def sp_candidates(model: ModelConfig, n: int, remat: str, per_node: int = 8):
    """(ring, ulysses) meshes of n sequence devices with U inside a node and U | heads."""
    h = model.llm.num_attention_heads
    for u in (1, 2, 4, 8):
        if n % u == 0 and u <= min(n, per_node) and h % u == 0:
            yield Candidate(1, 1, n // u, u, remat, 1, 1, zero_sp=n > 1)


def best_2d(model, n, seq_len, remat, cluster, only=None):
    preds = [
        predict(workload(model, seq_len), cluster, c)
        for c in sp_candidates(model, n, remat)
        if only is None or only(c)
    ]
    valid = [p for p in preds if p.valid]
    return max(valid, key=lambda p: p.tokens_per_s) if valid else None


def max_seq_len(model, n, remat, cluster) -> int:
    """The longest row (a multiple of 2 * n * 128) some 2D mesh fits (binary search)."""
    unit = 2 * n * 128
    lo, hi = 0, 1
    while best_2d(model, n, hi * unit, remat, cluster):
        lo, hi = hi, hi * 2
        if hi * unit > 2**26:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if best_2d(model, n, mid * unit, remat, cluster):
            lo = mid
        else:
            hi = mid
    return lo * unit


def ulysses_only(model, n, seq_len, remat, cluster):
    """R = 1 over all n devices. Beyond a node the all-to-all crosses InfiniBand: modelled as
    one 'node' of n devices whose links run at the IB bandwidth."""
    if model.llm.num_attention_heads % n:
        return None, f"{n} does not divide the {model.llm.num_attention_heads} heads"
    wide = (
        cluster
        if n <= cluster.devices_per_node
        else dataclasses.replace(cluster, devices_per_node=n, nvlink_gbps=cluster.ib_gbps)
    )
    p = predict(workload(model, seq_len), wide, Candidate(1, 1, 1, n, remat, zero_sp=True))
    return (p if p.valid else None), "; ".join(p.reasons)


def megatron(model, n, seq_len, remat, cluster) -> dict:
    """Megatron CP x TP: TP (largest of 8/4/2 dividing the heads and KV heads) inside a node,
    CP = n / TP as a zigzag ring across; ZeRO over CP. Same FLOPs per device as MM-SP; TP adds
    4 blocking all-reduces per layer (+2 with a recomputed forward), at NVLink bandwidth."""
    c = model.llm
    tp = next(
        t
        for t in (8, 4, 2, 1)
        if t <= min(n, 8) and c.num_attention_heads % t == 0 and c.num_key_value_heads % t == 0
    )
    cp = n // tp
    work = workload(model, seq_len)
    e = work.compute_bytes
    fl = step_flops(work.model, seq_len=seq_len, frames=work.frames, rows=1, remat=remat)
    peak = cluster.peak_tflops * 1e12
    t_mm = (fl.llm_matmul + fl.vision) / n / (peak * cluster.matmul_eff)
    t_attn = fl.llm_attention / n / (peak * cluster.attention_eff)
    extra_mm, extra_attn = REMAT_EXTRA[remat]
    lat = cluster.hop_latency_us * 1e-6
    tpb = comm.tp_bytes(1, seq_len // cp, c.hidden_size, tp, e)
    t_tp = c.num_hidden_layers * ((1 + extra_mm) * tpb["fwd"] + (tpb["fwd_bwd"] - tpb["fwd"]))
    t_tp = t_tp / (cluster.nvlink_gbps * 1e9) + c.num_hidden_layers * 6 * lat
    t_ring = 0.0
    if cp > 1:
        # The ring block: L / CP tokens on H_kv / TP heads (``ring_hop_bytes`` with U = TP).
        fwd, bwd = comm.ring_hop_bytes(
            1, seq_len, c.num_key_value_heads * c.dim_per_head, cp, tp, e, 4
        )
        bw = cluster.ib_gbps * 1e9 if n > cluster.devices_per_node else cluster.nvlink_gbps * 1e9
        step_fwd = fl.attention_fwd / n / c.num_hidden_layers / (peak * cluster.attention_eff)
        step_fwd /= cp
        exp_f = (cp - 1) * max(0.0, fwd / bw + lat - step_fwd)
        exp_b = cp * max(0.0, bwd / bw + lat - 2.5 * step_fwd)
        t_ring = c.num_hidden_layers * ((1 + extra_attn) * exp_f + exp_b)
    params = work.params({"data": 1, "fsdp": cp, "ring": 1, "ulysses": 1})
    mem = memory_breakdown(work.model, MemoryInputs(
        trainable=params.trainable / tp, frozen=0, total_params=params.total / tp,
        frozen_bytes=2, compute_bytes=e, fsdp=cp, ring=cp, ulysses=tp, rows=1,
        seq_len=seq_len, frames=work.frames, grad_accum=1, remat=remat, block_kernel="pallas",
        whole_trainable=params.whole_trainable,
    ))  # fmt: skip
    step = t_mm + t_attn + t_tp + t_ring
    return {
        "tp": tp,
        "cp": cp,
        "step_s": step,
        "compute_s": t_mm + t_attn,
        "tp_s": t_tp,
        "ring_exposed_s": t_ring,
        "memory_gib": mem["total"] / GIB,
        "fits": mem["total"] <= cluster.budget_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="h100-sxm")
    args = ap.parse_args()
    out = {"preset": args.preset, "max_seq": [], "speed": []}
    lines = [
        "| model | GPUs | max tokens, no remat | max tokens, full remat | mesh (U x R) |",
        "|---|---|---|---|---|",
    ]
    for name, path in MODELS.items():
        model = load_config(ModelConfig, ROOT / path)
        for n in GPUS:
            cluster = make_cluster(args.preset, nodes=max(1, n // 8), devices_per_node=min(n, 8))
            row = {"model": name, "gpus": n}
            for remat in ("none", "nothing_saveable"):
                row[remat] = max_seq_len(model, n, remat, cluster)
            p = best_2d(model, n, row["nothing_saveable"], "nothing_saveable", cluster)
            row["mesh"] = f"{p.candidate.ulysses} x {p.candidate.ring}" if p else "-"
            out["max_seq"].append(row)
            lines.append(
                f"| {name} | {n} | {row['none']:,} | {row['nothing_saveable']:,} | {row['mesh']} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "| model | GPUs | tokens | remat | 2D MM-SP s (U x R) | ring-only s | "
        "Ulysses-only s | Megatron CP x TP s | 2D vs ring | 2D vs Ulysses | 2D vs Megatron |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path in MODELS.items():
        model = load_config(ModelConfig, ROOT / path)
        for n in GPUS:
            cluster = make_cluster(args.preset, nodes=max(1, n // 8), devices_per_node=min(n, 8))
            for seq, remat in ((t * n, "nothing_saveable") for t in TOKENS_PER_GPU):
                two = best_2d(model, n, seq, remat, cluster)
                ring = best_2d(model, n, seq, remat, cluster, only=lambda c: c.ulysses == 1)
                uly, why = ulysses_only(model, n, seq, remat, cluster)
                meg = megatron(model, n, seq, remat, cluster)
                t2 = two.time["step"] if two else math.nan
                tr = ring.time["step"] if ring else math.nan
                tu = uly.time["step"] if uly else math.nan
                row = {
                    "model": name,
                    "gpus": n,
                    "seq_len": seq,
                    "remat": remat,
                    "mmsp_2d": two.row() if two else None,
                    "ring_only": ring.row() if ring else None,
                    "ulysses_only": uly.row() if uly else why,
                    "megatron": meg,
                }
                out["speed"].append(row)
                mesh = f"{two.candidate.ulysses} x {two.candidate.ring}" if two else "-"
                fmt = lambda t: "n/a" if math.isnan(t) else f"{t:.2f}"  # noqa: E731
                ratio = lambda a, b: "n/a" if math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"  # noqa: E731
                lines.append(
                    f"| {name} | {n} | {seq:,} | {remat} | {fmt(t2)} ({mesh}) | {fmt(tr)} | "
                    f"{fmt(tu)} | {meg['step_s']:.2f} (TP {meg['tp']} x CP {meg['cp']}) | "
                    f"{ratio(tr, t2)} | {ratio(tu, t2)} | {ratio(meg['step_s'], t2)} |"
                )
                print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
