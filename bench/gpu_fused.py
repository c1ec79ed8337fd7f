"""Single-GPU zigzag-ring emulation whose inner blocks run a fused cuDNN kernel returning the LSE.

On one GPU the ring's work is replayed sequentially: the row is cut into 2R chunks, virtual rank r
owns C_r || C_{2R-1-r}, and for every (rank, step) the dual-chunk schedule's blocks (causal or
unmasked, all a single-segment zigzag needs) run through cuDNN flash attention with its softmax
statistics (the LSE, kept in fp32) and merge in fp32 exactly as ``longvila_jax.parallel.ring``
merges. The fused LSE has no gradient, so the blocks sit inside a ``jax.custom_vjp`` whose
backward recomputes every block with the ring's XLA kernels (``ring.block_backward``) against
the global LSE: jax 0.10.2 exposes no fused backward that takes a global LSE.

Compared at equal shapes: full causal attention in one fused call (the single-kernel ceiling),
the zigzag emulation with fused blocks, and the same emulation with the XLA blocks the ring uses
on CPU. Forward error and gradient relative error against the full call are reported.

``--fused cudnn`` (the default) needs a CUDA GPU with cuDNN (``pip install
jax[cuda12]==0.10.2``). ``--fused xla`` swaps in ``jax.nn.dot_product_attention``'s XLA path
(same API, same residual), which is how tests/bench/test_gpu_fused.py checks the emulation,
merge and backward on CPU. No GPU has been lent to this repository yet, so the cuDNN run and
its results are still to come (see bench/RESULTS.md).

Usage:
  python bench/gpu_fused.py [--seq 32768] [--heads 32] [--kv-heads 8] [--dim 128] [--ring 8]
Writes bench/results/gpu_fused.json (``--out``), with the device kind.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.core.attention import MASK_VALUE
from longvila_jax.parallel.ring import block_backward, block_forward

RESULTS = Path(__file__).resolve().parent / "results"


def fused_block(q, k, v, causal: bool, scale: float, fused: str):
    """One block through a fused attention call that returns the LSE.

    Args:
      q: [b, t, h, d]; k, v: [b, s, hkv, d] (GQA grouped inside the kernel).
      fused: "cudnn" (cuDNN flash attention) or "xla" (``jax.nn.dot_product_attention``'s XLA
        path: the same API and residual layout, so the emulation can be checked on CPU).

    Returns:
      o: [b, t, h, d] fp32 (normalised), lse: [b, h, t] fp32.
    """
    if fused == "cudnn":
        # jax.nn.dot_product_attention casts cuDNN's fp32 softmax statistics to the output
        # dtype; a bf16 LSE of ~10 is off by up to ~0.04, i.e. ~4% in the merge weights. The
        # cuDNN module's own entry point returns the statistics in fp32 ([b, h, t]).
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
        out, lse = cudnn.dot_product_attention(
            q, k, v, scale=scale, mask_type=mask, return_residual=True
        )
        return out.astype(jnp.float32), lse.astype(jnp.float32)
    if fused != "xla":
        raise ValueError(f"--fused must be 'cudnn' or 'xla', got {fused!r}")
    out, lse = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="xla", return_residual=True
    )  # lse [b, t, h] in the input dtype: exact for fp32 inputs
    return out.astype(jnp.float32), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)


def xla_block(q, k, v, causal, scale, q_off, k_off, kv_chunk, **kernel):
    """The ring's own block (XLA chunked online softmax, or ``kernel``'s ``block_kernel``),
    positions from chunk offsets."""
    b = q.shape[0]
    qp = jnp.broadcast_to(q_off + jnp.arange(q.shape[1]), (b, q.shape[1]))
    kp = jnp.broadcast_to(k_off + jnp.arange(k.shape[1]), (b, k.shape[1]))
    one_q, one_k = jnp.ones_like(qp), jnp.ones_like(kp)
    return block_forward(
        q, k, v, one_q, one_k, qp, kp, causal=causal, scale=scale, kv_chunk=kv_chunk, **kernel
    )


def schedule(ring: int) -> list[tuple[int, int, bool]]:
    """All (q_chunk, kv_chunk, causal) blocks of the zigzag ring, every rank and step.

    The row is cut into 2R chunks and rank r owns chunks r and 2R-1-r; at step s it holds the
    KV of rank (r - s) mod R. Every causal (q_chunk >= kv_chunk) pair appears exactly once,
    the diagonal ones as causal blocks.
    """
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


def make_zigzag(
    ring: int,
    scale: float,
    kv_chunk: int,
    fused: str | None = None,
    block_kernel: str | None = None,
):
    """Causal attention on natural-order q [b, L, h, d], k/v [b, L, hkv, d] through the emulated
    zigzag ring (L divisible by 2 * ring). Forward blocks: ``fused_block(fused)``, or the ring's
    own block kernels when ``fused`` is None; the backward always recomputes with the ring's.
    ``block_kernel`` ("xla", "pallas", "auto"; None: the kernels' default) picks the ring's
    kernels (bench/gpu_suite.py times both)."""
    kernel = {} if block_kernel is None else {"block_kernel": block_kernel}

    def chunks(x):
        return jnp.split(x, 2 * ring, axis=1)

    def forward(q, k, v):
        c = q.shape[1] // (2 * ring)
        qs, ks, vs = chunks(q), chunks(k), chunks(v)
        acc = [None] * (2 * ring)
        for qi, ki, causal in schedule(ring):
            if fused is None:
                blk = xla_block(
                    qs[qi], ks[ki], vs[ki], causal, scale, qi * c, ki * c, kv_chunk, **kernel
                )
            else:
                blk = fused_block(qs[qi], ks[ki], vs[ki], causal, scale, fused)
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
                causal=causal, scale=scale, kv_chunk=kv_chunk, **kernel,
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


def _fwd_bwd(fn):
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    return jax.jit(run)


def _max_rel(g, r):
    g, r = g.astype(jnp.float32), r.astype(jnp.float32)
    return float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--ring", type=int, default=8)
    ap.add_argument("--kv-chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fused", choices=("cudnn", "xla"), default="cudnn")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_fused.json")
    args = ap.parse_args(argv)
    for name in ("seq", "heads", "kv_heads", "dim", "ring", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq % (2 * args.ring):
        ap.error(f"--seq {args.seq} must be divisible by 2 * --ring = {2 * args.ring}")
    if args.heads % args.kv_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def run(args: argparse.Namespace) -> dict:
    """Checks and times the three implementations; returns the JSON record."""
    dev = jax.devices()[0]
    if args.fused == "cudnn" and dev.platform != "gpu":
        raise SystemExit(
            f"--fused cudnn needs a CUDA GPU with cuDNN; found {dev.platform} "
            "(--fused xla --dtype float32 checks the emulation on CPU)"
        )
    dtype = jnp.dtype(args.dtype)
    b, s, h, hkv, d = 1, args.seq, args.heads, args.kv_heads, args.dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(keys[2], (b, s, hkv, d), dtype)
    ct = jax.random.normal(keys[3], (b, s, h, d), dtype)
    scale = d**-0.5

    def full(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation=args.fused
        )

    impls = {
        f"{args.fused} full causal": full,
        f"zigzag emulation, {args.fused} blocks": make_zigzag(
            args.ring, scale, args.kv_chunk, fused=args.fused
        ),
        "zigzag emulation, XLA blocks": make_zigzag(args.ring, scale, args.kv_chunk),
    }
    rows, ref_out, ref_grads = [], None, None
    for name, fn in impls.items():
        fb = _fwd_bwd(fn)
        out, grads = fb(q, k, v, ct)
        if ref_out is None:  # the first implementation, the full call, is the reference
            ref_out, ref_grads = out, grads
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
        rel = [_max_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
        row = {
            "impl": name,
            "fwd_s": _time(jax.jit(fn), (q, k, v), args.repeats),
            "fwd_bwd_s": _time(fb, (q, k, v, ct), args.repeats),
            "fwd_max_abs_err_vs_full": err,
            "grad_max_rel_err_vs_full": rel,
        }
        rows.append(row)
        print(
            f"{name:32s} fwd {row['fwd_s'] * 1e3:8.2f} ms  fwd+bwd {row['fwd_bwd_s'] * 1e3:8.2f} ms"
            f"  err {err:.2e}  grad rel {max(rel):.2e}",
            flush=True,
        )
    info = {"device_kind": dev.device_kind, "args": {**vars(args), "out": str(args.out)}}
    return {**info, "rows": rows, "mask_value": MASK_VALUE}


def main(argv=None) -> None:
    args = parse_args(argv)
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"device: {record['device_kind']}; wrote {args.out}")


if __name__ == "__main__":
    main()
