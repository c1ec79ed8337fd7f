"""Sections a and b of bench/gpu_suite.py: attention block kernels, and the zigzag ring
emulated on one device, each against a fused peer measured in the same run.

a. ``ring_kernels.block_forward`` / ``block_backward`` in the natural layout [b, t, h, d] with
   the XLA kernels and with ``block_kernel="pallas"`` (recorded as "not available" when this
   checkout's kernels lack the keyword), against ``jax.nn.dot_product_attention`` (cuDNN on a
   GPU). Our forward + backward is the ring's: the forward, then the backward recomputing the
   block from the final LSE. Errors are relative to the peer's largest output / gradient.
b. bench/gpu_fused.py's zigzag schedule (R virtual ranks, LSE merge in fp32, ``custom_vjp``
   backward from the global LSE) with our XLA and Pallas kernels and with the peer's fused
   blocks, against one fused causal call over the whole sequence.

FLOPs: forward 4 b h t^2 d over t x t scores (full), half that causal; forward + backward 3.5 x
the forward (the backward is 2.5 x).
"""

from __future__ import annotations

import inspect
import math
import time

import gpu_fused  # bench/ is the script's directory, so it is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from longvila_jax.parallel.ring_kernels import block_backward, block_forward


def kernel_keyword(fn, **kw) -> tuple[dict, str | None]:
    """``kw`` when ``fn`` accepts every keyword in it, else ({}, "not available: ...")."""
    params = inspect.signature(fn).parameters
    missing = [k for k in kw if k not in params]
    if missing:
        return {}, f"not available: {fn.__module__}.{fn.__name__} has no {missing[0]} keyword"
    return kw, None


def time_call(fn, args, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, best of ``repeats`` later calls) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best


def max_rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def attention_flops(b: int, h: int, t: int, d: int, causal: bool) -> float:
    """Forward FLOPs of attention over t x t scores: 4 b h t^2 d, halved when causal."""
    return 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)


def matmul_peak(n: int) -> dict:
    """Best-of-5 TFLOP/s of an n^3 bf16 matmul (the MFU denominator)."""
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    _, best = time_call(jax.jit(lambda a, b: a @ b), (a, b), 5)
    return {"size": n, "seconds": best, "tflops": 2.0 * n**3 / best / 1e12}


def _inputs(p, t: int, key: int = 0):
    ks = jax.random.split(jax.random.key(key), 4)
    q = jax.random.normal(ks[0], (1, t, p.heads, p.head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, p.kv_heads, p.head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, p.kv_heads, p.head_dim), jnp.bfloat16)
    do = jax.random.normal(ks[3], (1, t, p.heads, p.head_dim), jnp.bfloat16)
    return q, k, v, do


def _ours(causal: bool, scale: float, kv_chunk: int, kernel: dict):
    """Jitted (forward, forward + backward) of one natural-layout block through our kernels;
    the backward recomputes from the LSE exactly as the ring does."""

    def meta(x):
        b, t = x.shape[:2]
        return jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t))

    def fwd(q, k, v):
        (sq, pq), (sk, pk) = meta(q), meta(k)
        kw = dict(causal=causal, scale=scale, kv_chunk=kv_chunk, **kernel)
        return block_forward(q, k, v, sq, sk, pq, pk, **kw)

    def fwd_bwd(q, k, v, do):
        o, lse = fwd(q, k, v)
        (sq, pq), (sk, pk) = meta(q), meta(k)
        delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o)
        kw = dict(causal=causal, scale=scale, kv_chunk=kv_chunk, **kernel)
        return o, block_backward(q, k, v, do, lse, delta, sq, sk, pq, pk, **kw)

    return jax.jit(lambda q, k, v: fwd(q, k, v)[0]), jax.jit(fwd_bwd)


def _peer(causal: bool, scale: float, impl: str):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation=impl
        )

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def section_kernels(p, sec, ctx: dict) -> dict:
    """Section a: block kernel forward and forward + backward TFLOP/s."""
    scale = p.head_dim**-0.5
    pallas_fwd, why_fwd = kernel_keyword(block_forward, block_kernel="pallas")
    _, why_bwd = kernel_keyword(block_backward, block_kernel="pallas")
    impls = {f"dot_product_attention[{p.peer}]": None, "ours xla": {}, "ours pallas": pallas_fwd}
    rows, last_cost, last_t = [], 0.0, p.kernel_lengths[0]
    for t in p.kernel_lengths:
        q, k, v, do = _inputs(p, t)
        # Cost grows with t^2: the previous row's, scaled, is the estimate the budget checks.
        last_cost, last_t = last_cost * (t / last_t) ** 2, t
        repeats = p.repeats if t <= 32768 else 1  # a 128k row takes seconds per call
        for causal in (m == "causal" for m in p.masks):
            flops = attention_flops(1, p.heads, t, p.head_dim, causal)
            ref = None
            for name, kernel in impls.items():
                row = {"impl": name, "tokens": t, "mask": "causal" if causal else "full"}
                rows.append(row)
                if name == "ours pallas" and (why_fwd or why_bwd):
                    row["status"] = why_fwd or why_bwd
                    continue
                if sec.over(last_cost):
                    row["status"] = "skipped: section budget"
                    continue
                t0 = time.monotonic()
                try:
                    fwd, fwd_bwd = (
                        _peer(causal, scale, p.peer)
                        if kernel is None
                        else _ours(causal, scale, p.kv_chunk, kernel)
                    )
                    row["fwd_first_s"], fwd_s = time_call(fwd, (q, k, v), repeats)
                    row["fwd_bwd_first_s"], fb_s = time_call(fwd_bwd, (q, k, v, do), repeats)
                    row.update(fwd_ms=fwd_s * 1e3, fwd_tflops=flops / fwd_s / 1e12)
                    row.update(fwd_bwd_ms=fb_s * 1e3, fwd_bwd_tflops=3.5 * flops / fb_s / 1e12)
                    out, grads = fwd_bwd(q, k, v, do)
                    if kernel is None:
                        ref = (out, grads)
                    elif ref is not None:
                        row["out_err_vs_peer"] = max_rel(out, ref[0])
                        row["grad_err_vs_peer"] = max(
                            max_rel(g, r) for g, r in zip(grads, ref[1], strict=True)
                        )
                    row["status"] = "ok"
                except Exception as e:  # one row's failure (OOM, no cuDNN) is that row's
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
                last_cost = time.monotonic() - t0
    return {"rows": rows, "flops": "fwd 4*b*h*t*t*d (full), /2 causal; fwd+bwd 3.5x fwd"}


def section_ring(p, sec, ctx: dict) -> dict:
    """Section b: the zigzag ring emulated on one device against one fused call."""
    scale, t, r = p.head_dim**-0.5, p.ring_seq, p.ring
    q, k, v, do = _inputs(p, t, key=1)
    pallas, why = kernel_keyword(block_forward, block_kernel="pallas")
    impls = {
        f"dot_product_attention[{p.peer}] full causal": _peer(True, scale, p.peer)[0],
        f"zigzag R={r}, ours xla blocks": gpu_fused.make_zigzag(r, scale, p.kv_chunk),
        f"zigzag R={r}, ours pallas blocks": why
        or gpu_fused.make_zigzag(r, scale, p.kv_chunk, block_kernel="pallas"),
    }
    if p.ring_peer_blocks:
        blocks = gpu_fused.make_zigzag(r, scale, p.kv_chunk, fused=p.peer)
        impls[f"zigzag R={r}, {p.peer} fused blocks"] = blocks
    flops = attention_flops(1, p.heads, t, p.head_dim, causal=True)
    rows, ref, last_cost = [], None, 0.0
    for name, fn in impls.items():
        row = {"impl": name, "tokens": t, "ring": r}
        rows.append(row)
        if isinstance(fn, str):
            row["status"] = fn
            continue
        if sec.over(last_cost):
            row["status"] = "skipped: section budget"
            continue
        t0 = time.monotonic()
        try:
            fb = gpu_fused._fwd_bwd(fn)
            row["fwd_first_s"], fwd_s = time_call(jax.jit(fn), (q, k, v), p.repeats)
            row["fwd_bwd_first_s"], fb_s = time_call(fb, (q, k, v, do), p.repeats)
            row.update(fwd_ms=fwd_s * 1e3, fwd_tflops=flops / fwd_s / 1e12)
            row.update(fwd_bwd_ms=fb_s * 1e3, fwd_bwd_tflops=3.5 * flops / fb_s / 1e12)
            out, grads = fb(q, k, v, do)
            if ref is None:
                ref = (out, grads, fwd_s, fb_s)
            else:
                row["out_err_vs_full"] = max_rel(out, ref[0])
                row["grad_err_vs_full"] = max(
                    max_rel(g, x) for g, x in zip(grads, ref[1], strict=True)
                )
                row["fwd_bwd_vs_full"] = fb_s / ref[3]
            row["status"] = "ok"
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
        last_cost = time.monotonic() - t0
    return {"rows": rows, "flops": "causal 2*b*h*t*t*d fwd; fwd+bwd 3.5x fwd"}
