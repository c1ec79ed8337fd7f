"""Collective bytes per attention layer (forward, forward+backward) read from compiled HLO.

Compiles MM-SP attention (ring, Ulysses, 2D) on simulated CPU devices, counts every collective in
the post-partitioning HLO with loop trip counts applied (``hlo_collectives``), converts result
bytes to wire bytes sent per device, and compares with the analytic volumes of
parallelism.md section 7 (``analytic_bytes``, from ``longvila_jax.plan.comm``). Nothing is
executed, only compiled.

Usage:
  python bench/comm_bytes.py [--seq 8192] [--heads 8] [--dim 64]
Writes bench/results/comm_bytes.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8}
DT.update({"s64": 8, "u64": 8})
OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLL = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(OPS) + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_TRIP = re.compile(r'known_trip_count":\{"n":"(\d+)"')


def _nbytes(shape_text: str) -> int:
    return sum(
        DT[t] * math.prod(int(d) for d in dims.split(",") if d)
        for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text)
        if t in DT
    )


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    return len(m.group(1).split(",")) if m else 1


def _wire(op: str, result_bytes: int, n: int) -> float:
    """Bytes a device sends for one collective, from its result-buffer bytes."""
    if op == "collective-permute":
        return float(result_bytes)
    if op in ("all-gather", "all-to-all"):
        return result_bytes * (n - 1) / n
    if op == "reduce-scatter":
        return result_bytes * (n - 1)
    return result_bytes * 2 * (n - 1) / n  # ring all-reduce


def hlo_collectives(text: str) -> dict[str, dict[str, float]]:
    """Counts collectives of a compiled HLO module, multiplying loop bodies by their trip count.

    Args:
      text: ``compiled.as_text()``.

    Returns:
      op -> {"count", "result_bytes", "wire_bytes"} per device; conditionals count their most
      expensive branch. Raises if a loop containing collectives has no known trip count.
    """
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            if line.startswith("ENTRY"):
                entry = cur
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    memo: dict[str, dict] = {}

    def total(name: str) -> dict[str, list[float]]:
        if name in memo:
            return memo[name]
        acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

        def add(sub, mult):
            for op, (c, rb, wb) in sub.items():
                acc[op][0] += mult * c
                acc[op][1] += mult * rb
                acc[op][2] += mult * wb

        for line in comps.get(name, []):
            line = re.sub(r"/\*.*?\*/", "", line)  # tuple index comments contain '='
            for shape, op, _ in _COLL.findall(line):
                rb = _nbytes(shape)
                add({op: (1, rb, _wire(op, rb, _group_size(line)))}, 1)
            if " while(" in line:
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                sub = total(body)
                trip = _TRIP.search(line)
                if sub and not trip:
                    raise ValueError(f"loop {body} has collectives but no known trip count")
                add(sub, int(trip.group(1)) if trip else 0)
            m = re.search(r"branch_computations=\{([^}]*)\}", line)
            if m:
                branches = [total(b.strip().lstrip("%")) for b in m.group(1).split(",")]
                add(max(branches, key=lambda d: sum(v[2] for v in d.values())), 1)
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                add(total(callee), 1)
        memo[name] = acc
        return acc

    res = total(entry)
    keys = ("count", "result_bytes", "wire_bytes")
    return {op: dict(zip(keys, v, strict=True)) for op, v in res.items()}


def analytic_bytes(b, seq, heads, kv_heads, dim, ring, ulysses, e, e_acc=4) -> dict[str, float]:
    """Wire bytes sent per device per attention layer (parallelism.md section 7): the planner's
    formulas (``longvila_jax.plan.comm.attention_bytes``, the single source), fwd and fwd_bwd."""
    from longvila_jax.plan.comm import attention_bytes

    ana = attention_bytes(b, seq, heads, kv_heads, dim, ring, ulysses, e, e_acc)
    return {"fwd": ana["fwd"], "fwd_bwd": ana["fwd_bwd"]}


def compiled_mmsp(mesh, b, seq, heads, kv_heads, dim, dtype, kv_chunk, grad: bool):
    """Compiles MM-SP attention (forward or forward+backward) for abstract inputs."""
    from longvila_jax.parallel.attention import make_mmsp_attention

    attn = make_mmsp_attention(mesh, kv_chunk=kv_chunk)
    sd = jax.ShapeDtypeStruct
    args = (
        sd((b, seq, heads, dim), dtype),
        sd((b, seq, kv_heads, dim), dtype),
        sd((b, seq, kv_heads, dim), dtype),
        sd((b, seq), jnp.int32),
        sd((b, seq), jnp.int32),
    )

    def fwd(q, k, v, seg, pos):
        return attn(q, k, v, segment_ids=seg, positions=pos, causal=True, scale=dim**-0.5)

    if not grad:
        return jax.jit(fwd).lower(*args).compile()

    def fwd_bwd(q, k, v, seg, pos, ct):
        # Output and a cotangent input keep every collective alive, as inside a training step.
        out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, seg, pos), q, k, v)
        return out, vjp(ct)

    return jax.jit(fwd_bwd).lower(*args, args[0]).compile()


def main() -> None:
    from longvila_jax.parallel.mesh import MeshConfig, make_mesh

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kv-chunk", type=int, default=512)
    args = ap.parse_args()
    rows = []
    dtype, e = jnp.float32, 4  # XLA:CPU upcasts bf16 collectives to f32; fp32 keeps counts exact
    for kv_heads in (args.heads, args.heads // 4):
        for ring, uly in ((8, 1), (1, 8), (2, 4), (4, 2)):
            mesh = make_mesh(MeshConfig(ring=ring, ulysses=uly))
            ana = analytic_bytes(1, args.seq, args.heads, kv_heads, args.dim, ring, uly, e)
            row = {"ring": ring, "ulysses": uly, "heads": args.heads, "kv_heads": kv_heads}
            row.update(seq=args.seq, dim=args.dim, batch=1, dtype="float32")
            for mode, grad in (("fwd", False), ("fwd_bwd", True)):
                c = compiled_mmsp(
                    mesh, 1, args.seq, args.heads, kv_heads, args.dim, dtype, args.kv_chunk, grad
                )
                coll = hlo_collectives(c.as_text())
                wire = sum(v["wire_bytes"] for v in coll.values())
                row[mode] = {
                    "hlo_wire_bytes": wire,
                    "analytic_bytes": ana[mode],
                    "ratio": wire / ana[mode] if ana[mode] else None,
                    "by_op": coll,
                }
            rows.append(row)
            f, fb = row["fwd"], row["fwd_bwd"]
            mib = lambda x: x / 2**20  # noqa: E731
            print(
                f"R={ring} U={uly} H={args.heads} Hkv={kv_heads}  "
                f"fwd {mib(f['hlo_wire_bytes']):8.3f} MiB "
                f"(analytic {mib(f['analytic_bytes']):8.3f}, x{f['ratio']:.3f})  "
                f"fwd+bwd {mib(fb['hlo_wire_bytes']):8.3f} MiB (analytic "
                f"{mib(fb['analytic_bytes']):8.3f}, x{fb['ratio']:.3f})",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "comm_bytes.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
