"""Model-level sections of bench/gpu_suite.py: a real-size train step (c), the most tokens per
step that fit (d), and inference at a long context (e).

The train step is the trainer's own: ``train.state.create_state`` with the stage's dtype policy
(fp32 masters and AdamW moments, bf16 compute: ``train.precision``), ``make_train_step`` +
``jit_step`` (explicit shardings, donated state) and ``parallel.mmsp.MMSPPlan`` as the objective
on a 1-device mesh, so the LLM's attention is the ring's block kernels (a ring of one) and the
vision tower, projector and splice run as in MM-SP training. Only the batch is synthetic: one
row holding one video sample (``frames`` frames, each ``<image>`` + newline, then text to the
row length; the text after the frames is supervised).

Model FLOPs per step (for MFU) count every matmul of the forward once and multiply by 3
(backward = 2 x forward; the full-remat recomputation is not counted):
  LLM: 2 T (L (D (H + 2 Hkv) d_h + H d_h D + 3 D F) + D V) + L 2 T^2 H d_h (causal attention);
  tower: 2 N P (L_v (4 D_v^2 + 2 D_v F_v) + 3 p^2 D_v) + L_v N 4 P^2 D_v (full attention per
  frame); projector: 2 N t (m^2 D_v D + D^2) for N frames of P patches and t tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import OptimConfig, PrecisionConfig
from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.infer import SamplingParams, TokenGenerator
from longvila_jax.models.vlm import LongVILA
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.precision import DtypePolicy, forward_config
from longvila_jax.train.start import initial_params
from longvila_jax.train.state import ModelTemplate, create_state, state_shardings
from longvila_jax.train.step import jit_step, make_train_step

ROOT = Path(__file__).resolve().parents[1]
NEWLINE_ID = 10  # the text token after every frame's <image> (any in-vocabulary id)
FIT_MARGIN = 0.95  # compiled bytes must stay below this share of the device limit


def with_supported(fn, **kw) -> dict:
    """The keywords of ``kw`` that ``fn`` accepts (``block_kernel`` is newer than some
    checkouts this script may run against)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def frames_for(cfg: ModelConfig, seq_len: int, max_frames: int) -> int:
    """Frames of the synthetic row: the largest power of two up to ``max_frames`` whose tokens
    (``tokens_per_frame`` + a newline each) fill at most 80 % of the row."""
    fit = int(0.8 * seq_len / (cfg.tokens_per_frame + 1))
    return min(max_frames, 2 ** int(math.log2(fit))) if fit >= 1 else 0


def synthetic_row(cfg: ModelConfig, seq_len: int, frames: int, seed: int = 0) -> dict:
    """One pipeline-layout row (``data.pipeline`` keys) of ``seq_len`` expanded tokens: 8 text
    tokens, ``frames`` x (<image>, newline), then text; the text after the frames is supervised.
    """
    rng = np.random.default_rng(seed)
    tpf, image, vocab = cfg.tokens_per_frame, cfg.image_token_id, cfg.llm.vocab_size
    n_text = seq_len - frames * tpf  # text tokens, the newlines included
    tail = n_text - 8 - frames
    if tail < 2:
        raise ValueError(f"{frames} frames leave no text in a {seq_len}-token row")
    ids = np.concatenate(
        [
            rng.integers(11, vocab, 8),
            np.tile(np.array([image, NEWLINE_ID]), frames),
            rng.integers(11, vocab, tail),
        ]
    ).astype(np.int32)[None]
    widths = np.where(ids == image, tpf, 1)
    t2e = (np.cumsum(widths, axis=1) - widths).astype(np.int32)
    labels = np.full((1, seq_len), IGNORE_INDEX, np.int32)
    tail_cols = t2e[0, -tail:]
    labels[0, tail_cols[:-1]] = ids[0, -tail + 1 :]  # next-token targets, shifted on the row
    size = cfg.vision.image_size
    pixels = rng.random((1, frames, size, size, 3), dtype=np.float32) * 2 - 1
    return {
        "input_ids": ids,
        "text_segment_ids": np.ones_like(ids),
        "text_to_expanded": t2e,
        "frames": pixels,
        "frame_mask": np.ones((1, frames), bool),
        "frame_segment_ids": np.ones((1, frames), np.int32),
        "segment_ids": np.ones((1, seq_len), np.int32),
        "positions": np.arange(seq_len, dtype=np.int32)[None],
        "labels": labels,
    }


def model_flops(cfg: ModelConfig, seq_len: int, frames: int) -> float:
    """Model FLOPs of one train step on one row (formula in the module docstring)."""
    lc, vc = cfg.llm, cfg.vision
    d, dh, h, hkv = lc.hidden_size, lc.dim_per_head, lc.num_attention_heads, lc.num_key_value_heads
    per_token = lc.num_hidden_layers * (
        d * (h + 2 * hkv) * dh + h * dh * d + 3 * d * lc.intermediate_size
    )
    llm = 2 * seq_len * (per_token + d * lc.vocab_size)
    llm += lc.num_hidden_layers * 2 * seq_len**2 * h * dh
    dv, p, layers = vc.hidden_size, vc.num_patches, vc.layers_used
    tower = 2 * frames * p * (layers * (4 * dv**2 + 2 * dv * vc.intermediate_size))
    tower += 2 * frames * p * 3 * vc.patch_size**2 * dv + layers * frames * 4 * p**2 * dv
    m = cfg.projector.merge
    projector = 2 * frames * cfg.tokens_per_frame * (m * m * dv * d + d * d)
    return 3.0 * (llm + tower + projector)


def memory_of(compiled) -> dict:
    """Per-device bytes of a compiled step; ``total`` = arguments + outputs - aliased + temp."""
    ma = compiled.memory_analysis()
    out = {
        k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_memory() -> dict:
    """The allocator's counters (GPU); empty where the backend has none (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


@dataclasses.dataclass
class Probe:
    """One compiled step length: its plan, executable, frames, bytes and compile time."""

    seq_len: int
    frames: int
    plan: MMSPPlan
    compiled: object
    memory: dict
    compile_s: float


class Trainer:
    """The trainer's pieces for one model config on a 1-device mesh, and its live state."""

    def __init__(self, model_path: str, *, kv_chunk: int, block_kernel: str, max_frames: int):
        cfg = load_config(ModelConfig, ROOT / model_path, ("remat=nothing_saveable",))
        self.cfg, self.kv_chunk, self.max_frames = cfg, kv_chunk, max_frames
        self.block_kernel = block_kernel
        self.policy = DtypePolicy.of(PrecisionConfig(compute="bfloat16"), cfg)
        self.template = ModelTemplate.build(forward_config(cfg, self.policy))
        self.mesh_cfg = MeshConfig()
        self.mesh = make_mesh(self.mesh_cfg, jax.devices()[:1])
        self.param_sh = self.template.shardings(self.mesh, self.mesh_cfg.param_rules)
        optim = OptimConfig(lr=2e-5, warmup_steps=0, clip_norm=1.0)
        self.optimizer = make_optimizer(optim, 100)
        self.schedule = make_schedule(optim, 100)
        trainable = set(self.template.names)  # stage 5 trains every parameter

        def build(params, rng):
            return create_state(params, trainable, self.optimizer, rng=rng, policy=self.policy)

        self._build = build
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        abstract = jax.eval_shape(build, dict(self.template.shapes), rng)
        self.state_sh = state_shardings(abstract, self.param_sh, self.mesh, self.optimizer)
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sh
        )
        self._state = None
        self.last_compile_s = 0.0
        self.probes: dict[int, Probe] = {}

    def state(self):
        """The live train state (built on first use, and again after a failed step ate it)."""
        if self._state is None or any(x.is_deleted() for x in jax.tree.leaves(self._state)):
            self._state = None
            params = initial_params(self.cfg, None, self.template, self.param_sh, seed=0)
            rng = jnp.zeros((2,), jnp.uint32)
            self._state = jax.jit(self._build, out_shardings=self.state_sh)(params, rng)
        return self._state

    def compile(self, seq_len: int) -> Probe:
        """Compiles the step for one row of ``seq_len`` tokens from abstract arguments only."""
        frames = frames_for(self.cfg, seq_len, self.max_frames)
        plan = MMSPPlan(
            self.mesh,
            seq_len=seq_len,
            frame_slots=frames,
            tokens_per_frame=self.cfg.tokens_per_frame,
            image_token_id=self.cfg.image_token_id,
            kv_chunk=self.kv_chunk,
            **with_supported(MMSPPlan, block_kernel=self.block_kernel),
        )
        step = make_train_step(self.template, plan, self.optimizer, self.schedule)
        jitted = jit_step(step, self.state_sh, plan.shardings(), self.mesh)
        shapes = {k: (v.shape, v.dtype) for k, v in self.host_batch(plan, frames).items()}
        batch = {
            k: jax.ShapeDtypeStruct(*shapes[k], sharding=sh) for k, sh in plan.shardings().items()
        }
        t0 = time.perf_counter()
        compiled = jitted.lower(self.abstract, batch).compile()
        self.last_compile_s = time.perf_counter() - t0
        probe = Probe(seq_len, frames, plan, compiled, memory_of(compiled), self.last_compile_s)
        self.probes[seq_len] = probe
        return probe

    def host_batch(self, plan: MMSPPlan, frames: int) -> dict:
        return plan.host_arrays(synthetic_row(self.cfg, plan.seq_len, frames))

    def run(self, probe: Probe, steps: int) -> tuple[list[float], float]:
        """One warm-up and ``steps`` timed steps of ``probe``; (step seconds, last loss)."""
        shardings = probe.plan.shardings()
        arrays = self.host_batch(probe.plan, probe.frames)
        batch = {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}
        times, loss = [], math.nan
        for i in range(steps + 1):
            t0 = time.perf_counter()
            self._state, metrics = probe.compiled(self.state(), batch)
            jax.block_until_ready((self._state, metrics))
            if i:  # the first execution also loads the program
                times.append(time.perf_counter() - t0)
            loss = float(metrics["loss"])
        return times, loss


def trainer_of(p, ctx: dict) -> Trainer:
    if "trainer" not in ctx:
        ctx["trainer"] = Trainer(
            p.model,
            kv_chunk=p.train_kv_chunk,
            block_kernel=ctx["block_kernel"],
            max_frames=p.max_frames,
        )
    return ctx["trainer"]


def _step_row(tr: Trainer, probe: Probe, steps: int, peak_tflops: float | None) -> dict:
    times, loss = tr.run(probe, steps)
    step_s = float(np.median(times))
    flops = model_flops(tr.cfg, probe.seq_len, probe.frames)
    row = {
        "step_s": step_s,
        "tokens_per_s": probe.seq_len / step_s,
        "model_tflops": flops / step_s / 1e12,
        "model_flops_per_step": flops,
        "loss": loss,
        "device_memory": device_memory(),
    }
    if peak_tflops:
        row["mfu"] = row["model_tflops"] / peak_tflops
    return row


def section_train(p, sec, ctx: dict) -> dict:
    """Section c: train step time, MFU and memory at ``p.train_lengths`` tokens."""
    tr = trainer_of(p, ctx)
    peak = ctx["record"]["matmul_peak"].get("tflops")
    rows = []
    for seq_len in p.train_lengths:
        row: dict = {"tokens": seq_len}
        rows.append(row)
        if sec.over(tr.last_compile_s):
            row["status"] = "skipped: section budget"
            continue
        try:
            probe = tr.compile(seq_len)
            row.update(frames=probe.frames, compile_s=probe.compile_s, compiled=probe.memory)
            row.update(_step_row(tr, probe, p.train_steps, peak))
            row["status"] = "ok"
        except Exception as e:  # an OOM at one length is that row's result
            row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
    return {
        "rows": rows,
        "model": p.model,
        "remat": tr.cfg.remat,
        "dtypes": dataclasses.asdict(tr.policy),
        "block_kernel": tr.block_kernel,
        "peak_memory_note": "device_memory.peak_bytes_in_use is the process peak so far; "
        "this section runs first, so each row's is its own or a shorter row's",
    }


def fit_limit(p, tr: Trainer) -> tuple[int, str]:
    """The bytes a step may use, and where the figure comes from."""
    if p.fit_limit_bytes:
        return p.fit_limit_bytes, "Profile.fit_limit_bytes"
    limit = device_memory().get("bytes_limit")
    if limit:
        return int(limit), "memory_stats()['bytes_limit']"
    # CPU has no allocator limit: 1.5 x the smallest compiled step, so the search has a
    # boundary to find and the smoke run exercises every branch.
    smallest = min(tr.probes.values(), key=lambda x: x.seq_len, default=None)
    base = smallest or tr.compile(p.train_lengths[0])
    return int(1.5 * base.memory["total"]), "synthetic: 1.5 x the smallest step (no limit on CPU)"


def search_fit(p, sec, tr: Trainer, budget_bytes: float) -> tuple[int | None, list[dict]]:
    """Largest tested length whose compiled bytes fit: doubling, then bisection at the point
    the measured bytes interpolate to (they grow nearly linearly with the length)."""
    g = p.fit_granularity
    log: list[dict] = []
    compiles = 0

    def fits(seq_len: int) -> bool | None:
        nonlocal compiles
        if seq_len not in tr.probes:
            if compiles >= p.fit_max_compiles or sec.over(tr.last_compile_s):
                return None
            tr.compile(seq_len)
            compiles += 1
        need = tr.probes[seq_len].memory["total"]
        log.append({"tokens": seq_len, "bytes": need, "fits": need <= budget_bytes})
        return need <= budget_bytes

    known = {t: pr.memory["total"] <= budget_bytes for t, pr in tr.probes.items()}
    for t in sorted(known):  # compiled by section c
        log.append({"tokens": t, "bytes": tr.probes[t].memory["total"], "fits": known[t]})
    lo = max((t for t, ok in known.items() if ok), default=None)
    hi = min((t for t, ok in known.items() if not ok), default=None)
    if lo is None and hi is None:
        first = p.train_lengths[0]
        ok = fits(first)
        lo, hi = (first, None) if ok else (None, first)
    while hi is None and lo is not None:  # doubling
        ok = fits(2 * lo)
        if ok is None:
            return lo, log
        lo, hi = (2 * lo, None) if ok else (lo, 2 * lo)
    while lo is None and hi is not None and hi > g:  # halving when even the first is too big
        t = max(g, (hi // 2) // g * g)
        ok = fits(t)
        if ok is None:
            return None, log
        lo, hi = (t, hi) if ok else (None, t)
    while lo is not None and hi is not None and hi - lo > g:  # bisection
        m_lo, m_hi = tr.probes[lo].memory["total"], tr.probes[hi].memory["total"]
        guess = lo + (budget_bytes - m_lo) * (hi - lo) / max(m_hi - m_lo, 1)
        t = int(min(max(guess // g * g, lo + g), hi - g))
        ok = fits(t)
        if ok is None:
            break
        lo, hi = (t, hi) if ok else (lo, t)
    return lo, log


def section_fit(p, sec, ctx: dict) -> dict:
    """Section d: the most tokens per step that fit, then one real step at that length."""
    tr = trainer_of(p, ctx)
    limit, source = fit_limit(p, tr)
    budget_bytes = FIT_MARGIN * limit
    best, log = search_fit(p, sec, tr, budget_bytes)
    out: dict = {
        "limit_bytes": limit,
        "limit_source": source,
        "fit_margin": FIT_MARGIN,
        "granularity": p.fit_granularity,
        "probes": log,
        "max_tokens": best,
        "frames": tr.probes[best].frames if best else None,
    }
    if best is None:
        out["rows"] = [{"status": "error: no tested length fits"}]
        return out
    row: dict = {"tokens": best, "compiled": tr.probes[best].memory}
    try:
        row.update(_step_row(tr, tr.probes[best], 1, ctx["record"]["matmul_peak"].get("tflops")))
        row["status"] = "ok"
    except Exception as e:  # compiled bytes fit but the allocator disagreed
        row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
    out["rows"] = [row]
    return out


def section_infer(p, sec, ctx: dict) -> dict:
    """Section e: prefill tokens/s and decode ms/token of one long text prompt."""
    cfg = load_config(ModelConfig, ROOT / p.model)
    with nnx.use_eager_sharding(False):
        model = LongVILA(cfg, rngs=nnx.Rngs(0))  # random weights in the config's bf16
    kw = with_supported(TokenGenerator, block_kernel=ctx["block_kernel"])
    gen = TokenGenerator(model, kv_chunk=p.train_kv_chunk, **kw)
    rng = np.random.default_rng(0)
    prompt = rng.integers(11, cfg.llm.vocab_size, p.infer_context - 1).astype(np.int32)
    sampling = SamplingParams(max_new_tokens=p.decode_tokens + 1)

    def generate() -> list[float]:
        """Wall-clock time after each yielded token (the first one follows the prefill)."""
        marks = [time.perf_counter()]
        for _ in gen.iter_tokens([prompt], None, [0], sampling=sampling, stop_ids=[]):
            marks.append(time.perf_counter())
        return marks

    t0 = time.perf_counter()
    generate()  # compiles the prefill and the decode step
    first_s = time.perf_counter() - t0
    marks = generate()
    prefill_s = marks[1] - marks[0]
    decode = np.diff(marks[1:])
    row = {
        "context": int(prompt.size + 1),
        "first_call_s": first_s,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": prompt.size / prefill_s,
        "decode_steps": int(decode.size),
        "decode_ms_per_token": 1e3 * float(np.median(decode)),
        "device_memory": device_memory(),
        "status": "ok",
    }
    return {"rows": [row], "model": p.model, "prompt": "text only", **kw}
