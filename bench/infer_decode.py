"""MM-SP inference: prefill time and per-token decode time against sequence length, and decode
communication bytes per token read from the compiled HLO; sharded-KV decode with an LSE merge
(``combine="lse"``) side by side with a decode that all-gathers the cache (``"gather"``).

Timed part: a small text-only LongVILA (LLM ``--layers`` x ``--hidden``, ``--heads`` /
``--kv-heads``, fp32) on a simulated 8-device CPU mesh (ring x ulysses). For each prompt length
the MM-SP prefill is compiled, then timed (best of ``--repeats``); from its cache, ``--steps``
decode steps are timed per combine mode after one warm-up (compiling) step, each step waiting for
its logits as a generation loop does.

Compiled-only part: the same decode step for a real model config (default Qwen2-7B, bf16) at long
contexts, lowered with abstract arguments (nothing is allocated or run), to read its collective
bytes per token. Bytes come from ``bench/comm_bytes.py:hlo_collectives`` (post-partitioning HLO,
loop bodies multiplied by their trip counts); "wire" bytes are what one device sends.

Usage:
  python bench/infer_decode.py [--lengths 1024 2048 4096 8192] [--ring 2 --ulysses 4]
Writes bench/results/infer_decode.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from longvila_jax.config.base import load_config  # noqa: E402
from longvila_jax.config.model import ModelConfig  # noqa: E402
from longvila_jax.infer import Generator  # noqa: E402
from longvila_jax.infer.cache import KVCache, SeqMesh, cache_shardings  # noqa: E402
from longvila_jax.infer.decode import make_decode_step  # noqa: E402
from longvila_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def _hlo_collectives():
    spec = importlib.util.spec_from_file_location("comm_bytes", HERE / "comm_bytes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hlo_collectives


def _bytes(compiled) -> dict[str, float]:
    coll = _hlo_collectives()(compiled.as_text())
    return {
        "result_bytes": sum(v["result_bytes"] for v in coll.values()),
        "wire_bytes": sum(v["wire_bytes"] for v in coll.values()),
        "ops": {k: int(v["count"]) for k, v in coll.items()},
    }


def bench_config(a) -> ModelConfig:
    cfg = load_config(ModelConfig, ROOT / "configs/model/tiny-qwen2.yaml")
    llm = dataclasses.replace(
        cfg.llm,
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=1 << 20,
    )
    return dataclasses.replace(cfg, llm=llm, remat="none")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def timed_rows(a, mesh) -> list[dict]:
    model = _random_model(bench_config(a))
    gen = Generator(model, None, mesh=mesh)
    graphdef = nnx.graphdef(model)
    steps = {c: make_decode_step(graphdef, gen.seq_mesh, combine=c) for c in ("lse", "gather")}
    rng = np.random.default_rng(0)
    rows = []
    for length in a.lengths:
        ids = rng.integers(10, 500, length - 1).astype(np.int32)
        lp = gen._layout([ids], [0])
        inputs = gen._device_inputs(lp, None, lp.laid_out_index(lp.lengths[:, None] - 1))
        new = a.steps + 8

        def prefill(lp=lp, inputs=inputs, new=new):
            return gen._prefill(gen.state, *inputs, new_slots=-(-new // gen.seq_mesh.num_shards))

        t = time.perf_counter()
        jax.block_until_ready(prefill())
        compile_s = time.perf_counter() - t
        row = {"length": int(lp.text_ids.shape[1]), "prefill_s": _best(prefill, a.repeats)}
        cap = row["length"] + gen.seq_mesh.num_shards * -(-new // gen.seq_mesh.num_shards)
        row["analytic_wire"] = analytic_wire(model.cfg.llm, cap, gen.seq_mesh.num_shards, 4)
        row["prefill_first_call_s"] = compile_s
        for combine, step in steps.items():
            cache, logits = prefill()
            tok = jnp.argmax(logits[:, 0], -1)
            pos = jnp.asarray(lp.lengths)
            cache, lg = step(gen.state, cache, tok, pos, np.int32(0))  # compiles
            jax.block_until_ready(lg)
            per = []
            for t in range(1, a.steps + 1):
                start = time.perf_counter()
                cache, lg = step(gen.state, cache, tok, pos + t, np.int32(t))
                jax.block_until_ready(lg)
                per.append(time.perf_counter() - start)
            row[f"decode_{combine}_ms"] = 1e3 * float(np.median(per))
            args = (gen.state, cache, tok, pos, np.int32(0))
            row[f"decode_{combine}_comm"] = _bytes(step.lower(*args).compile())
        rows.append(row)
        print(_fmt_timed(row), flush=True)
    return rows


def _random_model(cfg):
    from longvila_jax.models.vlm import LongVILA

    return LongVILA(cfg, rngs=nnx.Rngs(0))


def compiled_rows(a, mesh) -> list[dict]:
    """Decode comm bytes per token for a real config, lowered with abstract arguments only."""
    from longvila_jax.models.vlm import LongVILA

    cfg = load_config(ModelConfig, ROOT / a.real_config)
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16")
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sm = SeqMesh(mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    lc = cfg.llm
    out = []
    for length in a.real_lengths:
        n = sm.num_shards
        cap = length + 8 * n
        sh = cache_shardings(sm)
        kv = (lc.num_hidden_layers, 1, cap, lc.num_key_value_heads, lc.dim_per_head)
        cache = KVCache(
            jax.ShapeDtypeStruct(kv, jnp.bfloat16, sharding=sh.k),
            jax.ShapeDtypeStruct(kv, jnp.bfloat16, sharding=sh.v),
            jax.ShapeDtypeStruct((1, cap), jnp.int32, sharding=sh.positions),
            jax.ShapeDtypeStruct((1, cap), jnp.int32, sharding=sh.segment_ids),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.base),
        )
        b1 = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=sm.sharding("batch"))
        row = {"config": a.real_config, "length": length}
        row["analytic_wire_bf16"] = analytic_wire(lc, cap, n, 2)
        for combine in ("lse", "gather"):
            step = make_decode_step(graphdef, sm, combine=combine)
            compiled = step.lower(state, cache, b1, b1, jax.ShapeDtypeStruct((), jnp.int32))
            row[f"decode_{combine}_comm"] = _bytes(compiled.compile())
        out.append(row)
        print(_fmt_comm(row), flush=True)
    return out


def analytic_wire(cfg_llm, length: int, n: int, e: int) -> dict[str, float]:
    """Bytes one device sends per decode token (batch 1), from the algorithm.

    lse: per layer an all-reduce of the max [H] and of the packed numerator/denominator
    [H, D + 1], fp32, ring all-reduce 2(n-1)/n. gather: per layer all-gathers of the K and V
    cache shards (``e`` bytes per element) plus, once, positions and segment ids (int32).
    """
    lc = cfg_llm
    ar = 2 * (n - 1) / n
    lse = lc.num_hidden_layers * 4 * lc.num_attention_heads * (lc.dim_per_head + 2) * ar
    kv = 2 * lc.num_hidden_layers * length * lc.num_key_value_heads * lc.dim_per_head * e
    gather = (kv + 2 * 4 * length) * (n - 1) / n
    return {"lse": lse, "gather": gather}


def _kb(x: float) -> str:
    return f"{x / 1024:,.1f} KiB" if x < 1 << 20 else f"{x / (1 << 20):,.1f} MiB"


def _fmt_timed(r: dict) -> str:
    lse, gat = r["decode_lse_comm"], r["decode_gather_comm"]
    return (
        f"| {r['length']:>6} | {r['prefill_s']:8.3f} | {r['decode_lse_ms']:8.2f} | "
        f"{r['decode_gather_ms']:8.2f} | {_kb(lse['wire_bytes'])} | {_kb(gat['wire_bytes'])} |"
    )


def _fmt_comm(r: dict) -> str:
    lse, gat = r["decode_lse_comm"], r["decode_gather_comm"]
    an = r["analytic_wire_bf16"]
    return (
        f"| {r['config']} | {r['length']:>8} | {_kb(lse['wire_bytes'])} | "
        f"{_kb(gat['wire_bytes'])} | {_kb(an['lse'])} | {_kb(an['gather'])} | "
        f"{an['gather'] / an['lse']:,.0f}x |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--ring", type=int, default=2)
    p.add_argument("--ulysses", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--real-config", default="configs/model/qwen2-7b-longvila-1m.yaml")
    p.add_argument("--real-lengths", type=int, nargs="+", default=[131072, 1048576])
    a = p.parse_args(argv)
    n = a.ring * a.ulysses
    mesh = make_mesh(MeshConfig(ring=a.ring, ulysses=a.ulysses), jax.devices()[:n])
    print(
        f"mesh ring={a.ring} x ulysses={a.ulysses}; model L={a.layers} D={a.hidden} "
        f"H={a.heads}/{a.kv_heads} fp32; batch 1"
    )
    print(
        "| tokens | prefill s | decode lse ms/tok | decode gather ms/tok | lse bytes/tok | "
        "gather bytes/tok |\n|---|---|---|---|---|---|"
    )
    timed = timed_rows(a, mesh)
    print(
        "\n| config (bf16) | tokens | lse HLO | gather HLO (CPU: f32) | lse analytic | "
        "gather analytic bf16 | ratio |\n|---|---|---|---|---|---|---|"
    )
    real = compiled_rows(a, mesh)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "args": vars(a),
        "devices": [str(d) for d in mesh.devices.flat],
        "timed": timed,
        "compiled_only": real,
    }
    (RESULTS / "infer_decode.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'infer_decode.json'}")


if __name__ == "__main__":
    main()
