"""Peak per-device memory of MM-SP attention (forward+backward) from compiled.memory_analysis().

Two sweeps on simulated CPU devices: sequence length at 8 devices (R=2 x U=4), and device count
at a fixed 2K tokens per device. Per-device bytes should scale with S/N (no S^2 buffer): the
ratio column divides each size by the smallest configuration's bytes and by its S/N ratio, so
1.00 means exactly proportional. Compiles only, executes nothing.

Usage:
  python bench/memory.py
Writes bench/results/memory.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comm_bytes import RESULTS, compiled_mmsp  # noqa: E402

HEADS, KV_HEADS, DIM, KV_CHUNK = 8, 4, 64, 512


def per_device_bytes(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    d = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    d["total"] = d["argument"] + d["output"] - d["alias"] + d["temp"]
    return d


def main() -> None:
    from longvila_jax.parallel.mesh import MeshConfig, make_mesh

    sweeps = {
        "seq_len at N=8 (R=2, U=4)": [(2, 4, s) for s in (4096, 8192, 16384, 32768)],
        "devices at S/N=2048": [(2, 1, 4096), (2, 2, 8192), (2, 4, 16384)],
    }
    out = {"heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "kv_chunk": KV_CHUNK, "sweeps": {}}
    for name, cases in sweeps.items():
        rows = []
        for ring, uly, seq in cases:
            n = ring * uly
            mesh = make_mesh(MeshConfig(ring=ring, ulysses=uly), jax.devices()[:n])
            c = compiled_mmsp(mesh, 1, seq, HEADS, KV_HEADS, DIM, jnp.float32, KV_CHUNK, True)
            row = {"ring": ring, "ulysses": uly, "devices": n, "seq": seq}
            rows.append({**row, **per_device_bytes(c)})
        base = rows[0]
        print(f"\n{name}")
        head = ("R", 3), ("U", 3), ("N", 3), ("S", 7), ("S/N", 6), ("temp MiB", 9)
        print(" ".join(f"{n:>{w}}" for n, w in (*head, ("total MiB", 10), ("ratio", 6))))
        for r in rows:
            scale = (r["seq"] / r["devices"]) / (base["seq"] / base["devices"])
            r["ratio_to_S_over_N"] = r["total"] / base["total"] / scale
            print(
                f"{r['ring']:>3} {r['ulysses']:>3} {r['devices']:>3} {r['seq']:>7} "
                f"{r['seq'] // r['devices']:>6} {r['temp'] / 2**20:>9.2f} "
                f"{r['total'] / 2**20:>10.2f} {r['ratio_to_S_over_N']:>6.3f}",
                flush=True,
            )
        out["sweeps"][name] = rows
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "memory.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
