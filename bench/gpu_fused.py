"""Single-GPU zigzag-ring emulation whose inner blocks run a fused cuDNN kernel returning the LSE.

On one GPU the ring's work is replayed sequentially: the row is cut into 2R chunks, virtual rank r
owns C_r || C_{2R-1-r}, and for every (rank, step) the dual-chunk schedule's blocks run through
``jax.nn.dot_product_attention(implementation="cudnn", return_residual=True)`` (causal or
unmasked blocks only, which is all a single-segment zigzag needs) and merge in fp32 with the
LSE, exactly as ``longvila_jax.parallel.ring`` merges. The cuDNN LSE has no gradient, so the
blocks sit inside a ``jax.custom_vjp`` whose backward recomputes every block with the XLA
kernels of ``ring.block_backward`` against the global LSE (a fused backward that accepts a
global LSE is not exposed by jax 0.10.2).

Compared, at equal shapes: cuDNN full causal attention (the single-kernel ceiling), the zigzag
emulation with cuDNN blocks, and the same emulation with the XLA blocks the ring uses on CPU.
Forward error and gradient relative error are checked against full cuDNN before timing.

Needs a CUDA GPU with cuDNN (``pip install jax[cuda12]==0.10.2``); on CPU it exits with a
message. It has not been run in this repository yet: no GPU was lent (see bench/RESULTS.md).

Usage:
  python bench/gpu_fused.py [--seq 32768] [--heads 32] [--kv-heads 8] [--dim 128] [--ring 8]
Writes bench/results/gpu_fused.json (with the device kind).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.models.attention import MASK_VALUE
from longvila_jax.parallel.ring import block_backward, block_forward

RESULTS = Path(__file__).resolve().parent / "results"


def cudnn_block(q, k, v, causal, scale):
    """Fused block: (o fp32 [b, t, h, d], lse fp32 [b, h, t])."""
    out, lse = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn", return_residual=True
    )
    return out.astype(jnp.float32), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)


def xla_block(q, k, v, causal, scale, q_off, k_off, kv_chunk):
    """The ring's own XLA block (chunked online softmax), positions from chunk offsets."""
    b = q.shape[0]
    qp = jnp.broadcast_to(q_off + jnp.arange(q.shape[1]), (b, q.shape[1]))
    kp = jnp.broadcast_to(k_off + jnp.arange(k.shape[1]), (b, k.shape[1]))
    one_q, one_k = jnp.ones_like(qp), jnp.ones_like(kp)
    return block_forward(
        q, k, v, one_q, one_k, qp, kp, causal=causal, scale=scale, kv_chunk=kv_chunk
    )


def schedule(ring: int) -> list[tuple[int, int, bool]]:
    """All (q_chunk, kv_chunk, causal) blocks of the zigzag ring, every rank and step."""
    blocks = []
    for r in range(ring):
        f, bk = r, 2 * ring - 1 - r
        for s in range(ring):
            j = (r - s) % ring
            jf, jb = j, 2 * ring - 1 - j
            if s == 0:  # the diagonal block, as the three non-empty quarters
                blocks += [(f, f, True), (bk, f, False), (bk, bk, True)]
            elif j < r:
                blocks += [(f, jf, False), (bk, jf, False)]
            else:
                blocks += [(bk, jf, False), (bk, jb, False)]
    return blocks


def _merge(acc, blk):
    if acc is None:
        return blk
    (o, lse), (o_b, lse_b) = acc, blk
    new = jnp.logaddexp(lse, lse_b)
    w_old = jnp.swapaxes(jnp.exp(lse - new), 1, 2)[..., None]
    w_new = jnp.swapaxes(jnp.exp(lse_b - new), 1, 2)[..., None]
    return o * w_old + o_b * w_new, new


def make_zigzag(ring: int, scale: float, kind: str, kv_chunk: int):
    """Causal attention on natural-order [b, L, h, d] through the emulated zigzag ring."""

    def chunks(x):
        return jnp.split(x, 2 * ring, axis=1)

    def forward(q, k, v):
        c = q.shape[1] // (2 * ring)
        qs, ks, vs = chunks(q), chunks(k), chunks(v)
        acc = [None] * (2 * ring)
        for qi, ki, causal in schedule(ring):
            if kind == "cudnn":
                blk = cudnn_block(qs[qi], ks[ki], vs[ki], causal, scale)
            else:
                blk = xla_block(qs[qi], ks[ki], vs[ki], causal, scale, qi * c, ki * c, kv_chunk)
            acc[qi] = _merge(acc[qi], blk)
        o = jnp.concatenate([a[0] for a in acc], axis=1)
        lse = jnp.concatenate([a[1] for a in acc], axis=2)
        return o.astype(q.dtype), lse

    @jax.custom_vjp
    def attn(q, k, v):
        return forward(q, k, v)[0]

    def fwd(q, k, v):
        o, lse = forward(q, k, v)
        return o, (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        c = q.shape[1] // (2 * ring)
        delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
        qs, ks, vs, dos = chunks(q), chunks(k), chunks(v), chunks(do)
        lses, deltas = jnp.split(lse, 2 * ring, axis=2), jnp.split(delta, 2 * ring, axis=2)
        dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
        dk = [jnp.zeros(x.shape, jnp.float32) for x in ks]
        dv = [jnp.zeros(x.shape, jnp.float32) for x in vs]
        b = q.shape[0]
        for qi, ki, causal in schedule(ring):
            qp = jnp.broadcast_to(qi * c + jnp.arange(c), (b, c))
            kp = jnp.broadcast_to(ki * c + jnp.arange(c), (b, c))
            ones = jnp.ones((b, c), jnp.int32)
            g_q, g_k, g_v = block_backward(
                qs[qi], ks[ki], vs[ki], dos[qi], lses[qi], deltas[qi], ones, ones, qp, kp,
                causal=causal, scale=scale, kv_chunk=kv_chunk,
            )  # fmt: skip
            dq[qi], dk[ki], dv[ki] = dq[qi] + g_q, dk[ki] + g_k, dv[ki] + g_v
        cat = functools.partial(jnp.concatenate, axis=1)
        return cat(dq).astype(q.dtype), cat(dk).astype(k.dtype), cat(dv).astype(v.dtype)

    attn.defvjp(fwd, bwd)
    return attn


def _time(f, args, repeats):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--ring", type=int, default=8)
    ap.add_argument("--kv-chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        sys.exit(f"bench/gpu_fused.py needs a CUDA GPU with cuDNN; found {dev.platform}")
    b, s, h, hkv, d = 1, args.seq, args.heads, args.kv_heads, args.dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (b, s, h, d), jnp.bfloat16)
    scale = d**-0.5

    def full(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"
        )

    impls = {
        "cudnn full causal": full,
        "zigzag emulation, cuDNN blocks": make_zigzag(args.ring, scale, "cudnn", args.kv_chunk),
        "zigzag emulation, XLA blocks": make_zigzag(args.ring, scale, "xla", args.kv_chunk),
    }

    def fwd_bwd(fn):
        def run(q, k, v, ct):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(ct)

        return jax.jit(run)

    ref_out, ref_grads = fwd_bwd(full)(q, k, v, ct)
    rows = []
    for name, fn in impls.items():
        out, grads = fwd_bwd(fn)(q, k, v, ct)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
        rel = [
            float(
                jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                / jnp.max(jnp.abs(r.astype(jnp.float32)))
            )
            for g, r in zip(grads, ref_grads, strict=True)
        ]
        row = {
            "impl": name,
            "fwd_s": _time(jax.jit(fn), (q, k, v), args.repeats),
            "fwd_bwd_s": _time(fwd_bwd(fn), (q, k, v, ct), args.repeats),
            "fwd_max_abs_err_vs_cudnn": err,
            "grad_max_rel_err_vs_cudnn": rel,
        }
        rows.append(row)
        print(
            f"{name:32s} fwd {row['fwd_s'] * 1e3:8.2f} ms  fwd+bwd {row['fwd_bwd_s'] * 1e3:8.2f} ms"
            f"  err {err:.2e}  grad rel {max(rel):.2e}",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "gpu_fused.json"
    info = {"device_kind": dev.device_kind, "args": vars(args), "dtype": "bfloat16"}
    path.write_text(json.dumps({**info, "rows": rows, "mask_value": MASK_VALUE}, indent=1))
    print(f"device: {dev.device_kind}; wrote {path}")


if __name__ == "__main__":
    main()
