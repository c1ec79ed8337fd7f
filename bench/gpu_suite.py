"""One-GPU benchmark suite: block kernels, the emulated zigzag ring, a real-size train step, the
largest step that fits, and inference at 64k tokens, with peers measured in the same run.

Sections (run in the order c, d, a, b, e: the train step first, so the allocator's peak memory
of a step is not one an earlier kernel left behind):

a. Block kernels at 8k, 32k and 128k tokens (bf16, causal and full, 32 query / 8 KV heads, head
   dim 128): ``ring_kernels.block_forward`` / ``block_backward`` in the natural layout
   [b, t, h, d] with the XLA kernels and with ``block_kernel="pallas"`` (recorded as "not
   available" when this checkout's kernels lack the keyword), against the peer
   ``jax.nn.dot_product_attention(implementation="cudnn")`` (forward, and forward + backward
   through ``jax.vjp``). FLOPs: forward 4 b h t^2 d (full), half that causal; forward +
   backward 3.5 x forward (the backward is 2.5 x).
b. The zigzag ring of R virtual ranks replayed on one device (bench/gpu_fused.py's schedule and
   LSE merge) with our XLA and Pallas block kernels, and with the peer's fused blocks, against
   one fused causal call over the whole sequence.
c. One train step of a real-size model (configs/model/qwen2-1.5b-longvila-256f.yaml: random
   init, SigLIP tower included, every parameter trained, fp32 masters and AdamW moments, bf16
   compute, full remat ``nothing_saveable``) on a 1-device mesh through the trainer's own
   pieces (``train.step.make_train_step`` + ``jit_step`` with the donated state,
   ``parallel.mmsp.MMSPPlan``) at 32k and 64k tokens: step time, tokens/s, MFU against a bf16
   matmul peak measured in the same run (8192^3), peak memory.
d. The most tokens per step that fit that device with full remat: compile-only
   ``memory_analysis()`` while doubling the length, then bisection (at the point the measured
   bytes interpolate to, since they grow nearly linearly), then one real step at that length.
e. Inference with ``infer.TokenGenerator`` (the public engine under ``Generator``): prefill
   tokens/s and decode ms/token of a 64k-token text prompt.

Every section is guarded (an exception is recorded with its error and the next section runs),
and a global time budget (``--budget``, 480 s) is shared out among the sections still to run;
rows and sections left when it is spent are recorded as skipped. The JSON is rewritten after
every section, so a killed run keeps what it measured.

``--cpu-smoke`` runs the same code at tiny shapes on one CPU device (tiny-qwen2 model, a few
hundred tokens, Pallas in interpret mode, the XLA implementation of
``jax.nn.dot_product_attention`` standing in for cuDNN); tests/bench/test_gpu_suite.py runs it.

Usage:
  python bench/gpu_suite.py [--budget 480] [--sections abcde] [--out bench/results/gpu_suite.json]
  python bench/gpu_suite.py --cpu-smoke --out /tmp/gpu_suite.json
Prints markdown tables for bench/RESULTS.md, headed with the card (``device_kind``).
"""

from __future__ import annotations

import os
import sys

from longvila_jax.train.xla_flags import apply_gpu_flags


def _prepare_environment(argv: list[str]) -> None:
    """What must be set before jax initialises: the CPU platform for the smoke run; on a GPU
    the trainer's XLA flags and nearly the whole card for XLA (its default preallocation is
    75 %, and section d measures what fits)."""
    if "--cpu-smoke" in argv:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    apply_gpu_flags()


_prepare_environment(sys.argv)
import time  # noqa: E402

T_START = time.monotonic()  # the budget counts from here: jax's start-up is part of the run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import gpu_suite_kernels  # noqa: E402  (bench/ is the script's directory, so it is on sys.path)
import gpu_suite_model  # noqa: E402
import jax  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = "cdabe"
# Share of the remaining budget each section gets (renormalised over those still to run).
SHARES = {"a": 0.25, "b": 0.08, "c": 0.25, "d": 0.25, "e": 0.17}
NAMES = {"a": "a_kernels", "b": "b_ring", "c": "c_train", "d": "d_fit", "e": "e_infer"}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Shapes of one run: the GPU suite or the CPU smoke test of the same code."""

    kernel_lengths: tuple[int, ...] = (8192, 32768, 131072)
    masks: tuple[str, ...] = ("causal", "full")
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    kv_chunk: int = 1024
    repeats: int = 3
    ring: int = 8
    ring_seq: int = 32768
    ring_peer_blocks: bool = True  # also time the zigzag with the peer's fused blocks
    model: str = "configs/model/qwen2-1.5b-longvila-256f.yaml"
    train_lengths: tuple[int, ...] = (32768, 65536)
    max_frames: int = 256
    train_kv_chunk: int = 512
    train_steps: int = 3
    fit_granularity: int = 16384
    fit_max_compiles: int = 5
    fit_limit_bytes: int | None = None  # None: the device's own limit (memory_stats)
    infer_context: int = 65536
    decode_tokens: int = 32
    matmul: int = 8192
    peer: str = "cudnn"  # jax.nn.dot_product_attention implementation


# The smoke run compiles as little as it can (compiles are nearly all of its time): one kernel
# length and mask, no peer-blocks ring row (tests/bench/test_gpu_fused.py covers it), one train
# length whose executable section d reuses (its search is unit-tested on its own).
SMOKE = Profile(
    kernel_lengths=(128,), masks=("causal",), heads=4, kv_heads=2, head_dim=32, kv_chunk=32,
    repeats=1, ring=2, ring_seq=128, ring_peer_blocks=False,
    model="configs/model/tiny-qwen2.yaml", train_lengths=(256,), max_frames=8,
    train_kv_chunk=64, train_steps=1, fit_granularity=256, fit_max_compiles=0,
    fit_limit_bytes=None, infer_context=256, decode_tokens=4, matmul=512, peer="xla",
)  # fmt: skip


class Section:
    """One section's time: its deadline, and a check rows make before they start."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def over(self, estimate: float = 0.0) -> bool:
        """True when a row expected to take ``estimate`` seconds would end past the deadline."""
        return time.monotonic() + estimate > self.deadline


class Budget:
    """The global time budget, shared out among the sections still to run."""

    def __init__(self, seconds: float, sections: str):
        self.total, self.start = seconds, T_START
        self.shares = {s: SHARES[s] for s in sections}

    def remaining(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def section(self, name: str) -> Section:
        share = self.shares.pop(name)
        fraction = share / (share + sum(self.shares.values()))
        return Section(time.monotonic() + max(self.remaining(), 0.0) * fraction)


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


SECTIONS = {
    "a": gpu_suite_kernels.section_kernels,
    "b": gpu_suite_kernels.section_ring,
    "c": gpu_suite_model.section_train,
    "d": gpu_suite_model.section_fit,
    "e": gpu_suite_model.section_infer,
}


def _fmt(x, spec: str = ".1f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def _status(row: dict) -> str:
    return "" if row.get("status") == "ok" else str(row.get("status", ""))[:60]


def tables(record: dict) -> str:
    """Markdown for bench/RESULTS.md: one table per section that ran."""
    out = [
        f"### gpu_suite on {record['device_kind']} (jax {record['jax_version']}, "
        f"{'CPU smoke' if record['cpu_smoke'] else 'GPU'}, {record['elapsed_s']:.0f} s)",
        "",
        f"bf16 matmul peak ({record['matmul_peak'].get('size', '-')}^3): "
        f"{_fmt(record['matmul_peak'].get('tflops'))} TFLOP/s; XLA_FLAGS: "
        f"`{record['xla_flags'] or '(none)'}`",
    ]
    secs = record["sections"]
    for key in sorted(secs):
        sec = secs[key]
        out += ["", f"**{key}** ({sec.get('status')}, {_fmt(sec.get('seconds'), '.0f')} s)"]
        if sec.get("status") in ("error", "skipped"):
            out.append(f"{sec.get('error') or sec.get('reason')}")
            continue
        rows = sec.get("rows", [])
        if key in ("a_kernels", "b_ring"):
            out += [
                "| impl | tokens | mask | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
                "| err vs peer | note |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                err = r.get("out_err_vs_peer", r.get("out_err_vs_full"))
                out.append(
                    f"| {r.get('impl', '-')} | {r.get('tokens', '-')} | "
                    f"{r.get('mask', 'causal')} | "
                    f"{_fmt(r.get('fwd_ms'), '.2f')} | {_fmt(r.get('fwd_tflops'))} | "
                    f"{_fmt(r.get('fwd_bwd_ms'), '.2f')} | {_fmt(r.get('fwd_bwd_tflops'))} | "
                    f"{_fmt(err, '.1e')} | {_status(r)} |"
                )
        else:
            out += model_table(key, sec)
    return "\n".join(out)


def model_table(key: str, sec: dict) -> list[str]:
    """Markdown rows of sections c, d, e."""

    def f(x, spec=".2f"):
        return _fmt(x, spec)

    gib = 1 << 30
    rows = sec.get("rows", [])
    if key == "e_infer":
        out = ["| context | prefill s | prefill tok/s | decode ms/tok |", "|---|---|---|---|"]
        for r in rows:
            out.append(
                f"| {r.get('context')} | {f(r.get('prefill_s'))} | "
                f"{f(r.get('prefill_tokens_per_s'), ',.0f')} | {f(r.get('decode_ms_per_token'))} |"
            )
        return out
    out = []
    if key == "d_fit":
        out.append(
            f"max tokens/step {sec.get('max_tokens')} ({sec.get('frames')} frames) under "
            f"{f(sec.get('fit_margin', 1.0) * sec.get('limit_bytes', 0) / gib)} GiB "
            f"({sec.get('limit_source')}); "
            f"probes: "
            + ", ".join(f"{x['tokens']}:{x['bytes'] / gib:.1f}GiB" for x in sec["probes"])
        )
    out += [
        "| tokens | frames | step s | tokens/s | model TFLOP/s | MFU | compiled GiB | peak GiB "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r.get("device_memory", {}).get("peak_bytes_in_use")
        note = "" if r.get("status") == "ok" else str(r.get("status"))[:60]
        out.append(
            f"| {r.get('tokens')} | {r.get('frames', sec.get('frames'))} | {f(r.get('step_s'))} | "
            f"{f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('model_tflops'), '.1f')} | "
            f"{f(r.get('mfu'), '.1%')} | {f(r.get('compiled', {}).get('total', 0) / gib)} | "
            f"{f(peak / gib) if peak else '-'} | {note} |"
        )
    return out


def planner_summary(record: dict) -> dict:
    """The measured rates in the keys ``longvila_jax.plan.hardware.measured_efficiency`` reads
    (kept under ``planner``), which it divides by the card's nominal peak: ``matmul_tflops``, the
    model TFLOP/s of the shortest train step (the whole step's achieved rate, not the bare GEMM
    peak), and ``attention_tflops``, the fused Pallas kernel's causal fwd+bwd TFLOP/s at the
    longest length measured. Keys without a measurement are absent."""
    out: dict = {}
    secs = record["sections"]
    steps = [r for r in secs.get("c_train", {}).get("rows", []) if "model_tflops" in r]
    if steps:
        out["matmul_tflops"] = min(steps, key=lambda r: r["tokens"])["model_tflops"]
    kernel_rows = [
        r
        for r in secs.get("a_kernels", {}).get("rows", [])
        if r.get("impl") == "ours pallas" and r.get("mask") == "causal" and "fwd_bwd_tflops" in r
    ]
    if kernel_rows:
        longest = max(r["tokens"] for r in kernel_rows)
        out["attention_tflops"] = max(
            r["fwd_bwd_tflops"] for r in kernel_rows if r["tokens"] == longest
        )
    return out


def write(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace) -> dict:
    """Runs the chosen sections in ``ORDER`` under the budget; returns the JSON record."""
    p = SMOKE if args.cpu_smoke else Profile()
    dev = jax.devices()[0]
    budget = Budget(args.budget, "".join(s for s in ORDER if s in args.sections))
    record = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "cpu_smoke": args.cpu_smoke,
        "budget_s": args.budget,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "profile": dataclasses.asdict(p),
        "block_kernel": args.block_kernel,
        "matmul_peak": {},
        "sections": {},
        "elapsed_s": 0.0,
    }
    ctx: dict = {"block_kernel": args.block_kernel, "record": record}
    print(f"device: {dev.device_kind} ({dev.platform}); budget {args.budget:.0f} s", flush=True)
    try:
        record["matmul_peak"] = gpu_suite_kernels.matmul_peak(p.matmul)
    except Exception as e:
        record["matmul_peak"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    for key in (s for s in ORDER if s in args.sections):
        name = NAMES[key]
        if budget.remaining() <= 0:
            record["sections"][name] = skipped(f"global budget of {args.budget:.0f} s spent")
            budget.shares.pop(key)
        else:
            sec = budget.section(key)
            t0 = time.monotonic()
            try:
                out = SECTIONS[key](p, sec, ctx)
                bad = [r for r in out.get("rows", []) if str(r.get("status")).startswith("error")]
                out["status"] = "partial" if bad else "ok"
            except Exception as e:  # the section's failure is recorded; the next one runs
                out = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {str(e)[:2000]}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            out["seconds"] = time.monotonic() - t0
            record["sections"][name] = out
        if not any(s in "cd" for s in budget.shares):
            ctx.pop("trainer", None)  # its train state would crowd the kernels and inference
            gc.collect()
        record["elapsed_s"] = time.monotonic() - budget.start
        record["planner"] = planner_summary(record)
        print(f"[{name}] {record['sections'][name]['status']}", flush=True)
        write(record, args.out)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on one CPU device")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all sections")
    ap.add_argument("--sections", default="abcde", help="which of a-e to run")
    ap.add_argument(
        "--block-kernel",
        default="auto",
        choices=("auto", "xla", "pallas"),
        help="ring block kernels of the train step and the prefill (sections c-e)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_suite.json")
    args = ap.parse_args(argv)
    if not set(args.sections) <= set("abcde") or not args.sections:
        ap.error(f"--sections must be letters of abcde, got {args.sections!r}")
    if args.budget <= 0:
        ap.error("--budget must be > 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    record = run(args)
    print()
    print(tables(record))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
