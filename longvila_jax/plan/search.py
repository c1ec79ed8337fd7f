"""Enumerate every mesh for a device count, predict each one's memory and step time, rank them.

A candidate is a factorisation data * fsdp * ring * ulysses = devices, a remat policy and a
micro-batch (rows per batch group per micro-batch; the rest of the global batch is gradient
accumulation). Invalid candidates are kept with every reason that rules them out:

- Ulysses must divide the query heads (``parallel.ulysses.kv_replication``); when it does not
  divide the KV heads they are replicated lcm(H_kv, U) / H_kv times, as the attention does, so
  that is valid (the note says so) and costs the replicated bytes.
- A Ulysses group must lie inside one node (its all-to-all blocks and wants NVLink;
  ``parallel.mesh.validate_mesh`` requires U to divide a host's devices).
- The row length must be a multiple of 2 * ring * ulysses * block_size (zigzag layout).
- The global batch must split over data * fsdp groups.
- The predicted memory must fit the device's budget.

Step time (per optimizer step, ``Prediction``): compute from ``plan.flops`` at the cluster's
achieved efficiencies; communication from ``plan.comm``: the Ulysses all-to-all (blocking, on
NVLink), ring hops overlapped with the block compute they run beside (only the excess over the
block's compute is exposed, plus a fixed per-hop latency), FSDP gathers and reduce-scatters and
the data-parallel all-reduce (exposed: GSPMD issues them around the layer scan), and the MM-SP
routing of visual tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import longvila_jax.plan.comm as comm
from longvila_jax.config.base import ConfigError
from longvila_jax.parallel.mesh import MeshConfig, validate_mesh
from longvila_jax.parallel.ulysses import kv_replication
from longvila_jax.plan.flops import REMAT_EXTRA, step_flops
from longvila_jax.plan.hardware import GIB, Cluster
from longvila_jax.plan.memory import MemoryInputs, memory_breakdown
from longvila_jax.plan.workload import Workload

REMATS = ("none", "nothing_saveable", "save_attention", "dots_with_no_batch_dims_saveable")
MAX_MICRO_ROWS = 8


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search: mesh sizes, remat policy, rows per group per micro-batch."""

    data: int
    fsdp: int
    ring: int
    ulysses: int
    remat: str
    micro_rows: int = 1
    block_size: int = 1
    # ZeRO-3 over the sequence axes too: parameters sharded over (fsdp, ring, ulysses), as
    # DeepSpeed shards them over every rank of an SP group (upstream's stage 5).
    zero_sp: bool = False

    @property
    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "ring": self.ring, "ulysses": self.ulysses}

    @property
    def groups(self) -> int:
        return self.data * self.fsdp

    @property
    def param_shards(self) -> int:
        """Devices one parameter is sharded over."""
        return self.fsdp * (self.ring * self.ulysses if self.zero_sp else 1)

    def param_rules(self) -> dict[str, tuple[str, ...]]:
        axes = ("fsdp", "ring", "ulysses") if self.zero_sp else ("fsdp",)
        return {"embed": axes, "vision_embed": axes}

    def mesh_config(self) -> MeshConfig:
        return MeshConfig(**self.sizes, block_size=self.block_size, param_rules=self.param_rules())


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A candidate with its predictions (bytes per device, seconds per optimizer step)."""

    candidate: Candidate
    grad_accum: int
    memory: dict[str, float]
    time: dict[str, float]
    tokens_per_s: float
    mfu: float
    reasons: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.reasons

    def row(self) -> dict:
        """A flat JSON-ready record."""
        c = self.candidate
        return {
            **c.sizes,
            "remat": c.remat,
            "zero_sp": c.zero_sp,
            "micro_rows": c.micro_rows,
            "grad_accum": self.grad_accum,
            "valid": self.valid,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "memory_gib": {k: v / GIB for k, v in self.memory.items()},
            "time_s": self.time,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
        }


def factorisations(n: int, parts: int = 4) -> Iterator[tuple[int, ...]]:
    """Every ordered tuple of ``parts`` positive integers whose product is ``n``."""
    if parts == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in factorisations(n // d, parts - 1):
                yield (d, *rest)


def structural_reasons(
    work: Workload, cluster: Cluster, c: Candidate, accum: int | None = None
) -> list[str]:
    """Why a candidate cannot run, memory aside (empty: it can)."""
    llm = work.model.llm
    h = llm.num_attention_heads
    out = []
    if h % c.ulysses:
        out.append(f"ulysses {c.ulysses} does not divide the {h} query heads")
    if c.ulysses > cluster.devices_per_node or cluster.devices_per_node % c.ulysses:
        out.append(
            f"a Ulysses group of {c.ulysses} spans nodes of {cluster.devices_per_node} devices"
        )
    multiple = 2 * c.ring * c.ulysses * c.block_size
    if work.seq_len % multiple:
        out.append(f"seq_len {work.seq_len} is not a multiple of 2*ring*ulysses*block = {multiple}")
    rows = work.global_rows
    if rows is not None and rows % (c.groups * c.micro_rows):
        out.append(
            f"{rows} rows per step do not split into {c.groups} groups x {c.micro_rows} rows"
        )
    elif rows is not None and accum is not None and rows != c.groups * c.micro_rows * accum:
        out.append(f"{rows} rows per step do not split into grad_accum {accum} micro-batches")
    return out


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a collective whose group spans ``span`` consecutive devices."""
    gbps = cluster.nvlink_gbps if span <= cluster.devices_per_node else cluster.ib_gbps
    return gbps * 1e9


def predict(
    work: Workload,
    cluster: Cluster,
    c: Candidate,
    block_kernel: str = "pallas",
    grad_accum: int | None = None,
) -> Prediction:
    """Memory and step time of one candidate (module docstring); never raises for an invalid
    candidate, which comes back with its reasons. ``grad_accum`` fixes the micro-batches."""
    reasons = structural_reasons(work, cluster, c, grad_accum)
    notes = []
    llm, model = work.model.llm, dataclasses.replace(work.model, remat=c.remat)
    e = work.compute_bytes
    params = work.params(c.sizes, c.param_rules())
    sp = c.ring * c.ulysses
    rows_step = work.global_rows if work.global_rows is not None else c.groups * c.micro_rows
    accum = max(1, rows_step // (c.groups * c.micro_rows))
    h, hkv, d = llm.num_attention_heads, llm.num_key_value_heads, llm.dim_per_head
    rep = kv_replication(h, hkv, c.ulysses) if h % c.ulysses == 0 else 1
    if rep > 1:
        notes.append(f"KV heads replicated x{rep} for ulysses {c.ulysses}")
    mem = memory_breakdown(
        model,
        MemoryInputs(
            trainable=params.trainable,
            frozen=params.frozen,
            total_params=params.total,
            frozen_bytes=work.frozen_bytes,
            compute_bytes=e,
            fsdp=c.param_shards,
            ring=c.ring,
            ulysses=c.ulysses,
            rows=c.micro_rows,
            seq_len=work.seq_len,
            frames=work.frames,
            grad_accum=accum,
            remat=c.remat,
            block_kernel=block_kernel,
            whole_trainable=params.whole_trainable,
        ),
    )
    if mem["total"] > cluster.budget_bytes:
        reasons.append(
            f"needs {mem['total'] / GIB:.1f} GiB > {cluster.budget_bytes / GIB:.1f} GiB budget"
        )
    if h % c.ulysses:  # no head layout exists: memory is reported, no time
        return Prediction(c, accum, mem, {}, 0.0, 0.0, tuple(reasons), tuple(notes))
    n = cluster.devices
    micro_rows_global = c.micro_rows * c.groups
    fl = step_flops(
        model, seq_len=work.seq_len, frames=work.frames, rows=micro_rows_global, remat=c.remat
    )
    peak = cluster.peak_tflops * 1e12
    t_matmul = (fl.llm_matmul + fl.vision) / n / (peak * cluster.matmul_eff)
    t_attn = fl.llm_attention / n / (peak * cluster.attention_eff)
    extra_mm, extra_attn = REMAT_EXTRA[c.remat]
    layers = llm.num_hidden_layers
    lat = cluster.hop_latency_us * 1e-6
    # Ulysses: blocking all-to-all inside the node; forward, backward, recomputed forward.
    att = comm.attention_bytes(c.micro_rows, work.seq_len, h, hkv, d, c.ring, c.ulysses, e)
    uly_passes = 2 + extra_attn
    t_uly = 0.0
    if c.ulysses > 1:
        bw = _bandwidth(cluster, c.ulysses)
        t_uly = layers * uly_passes * (att["ulysses_fwd"] / bw + 4 * lat)
    # Ring: each hop overlaps the block compute of its step; the excess is exposed.
    t_ring_total = t_ring_exposed = 0.0
    if c.ring > 1:
        bw = _bandwidth(cluster, sp)
        hop_fwd, hop_bwd = comm.ring_hop_bytes(
            c.micro_rows, work.seq_len, hkv * rep * d, c.ring, c.ulysses, e, 4
        )
        attn_fwd_layer = fl.attention_fwd / n / layers / (peak * cluster.attention_eff)
        step_fwd, step_bwd = attn_fwd_layer / c.ring, 2.5 * attn_fwd_layer / c.ring
        t_hop_fwd, t_hop_bwd = hop_fwd / bw + lat, hop_bwd / bw + lat
        fwd_exposed = (c.ring - 1) * max(0.0, t_hop_fwd - step_fwd)
        bwd_exposed = c.ring * max(0.0, t_hop_bwd - step_bwd)
        t_ring_exposed = layers * ((1 + extra_attn) * fwd_exposed + bwd_exposed)
        t_ring_total = layers * ((1 + extra_attn) * (c.ring - 1) * t_hop_fwd + c.ring * t_hop_bwd)
    # FSDP: whole-model gathers (compute dtype) twice and fp32 gradient reduce-scatter.
    t_fsdp = 0.0
    if c.param_shards > 1:
        vol = comm.fsdp_bytes(params.total * e, params.trainable_total * 4, c.param_shards)
        bw = _bandwidth(cluster, sp * c.fsdp)
        t_fsdp = (vol["all_gather"] + vol["reduce_scatter"]) / bw + 3 * lat
    # Data parallel: all-reduce of the (FSDP-sharded) fp32 gradients, every micro-batch.
    t_dp = 0.0
    if c.data > 1:
        bw = _bandwidth(cluster, n)
        t_dp = comm.allreduce_bytes(params.trainable * 4, c.data) / bw + 2 * lat
    t_route = 0.0
    if work.frames and sp > 1:
        local = c.micro_rows * math.ceil(work.frames / sp) * work.model.tokens_per_frame
        t_route = (2 + extra_mm) * comm.routing_bytes(local, llm.hidden_size, sp, e)
        t_route /= _bandwidth(cluster, sp)
    compute = t_matmul + t_attn
    exposed = t_uly + t_ring_exposed + t_fsdp + t_dp + t_route
    step = accum * (compute + exposed)
    time = {
        "step": step,
        "compute": accum * compute,
        "matmul": accum * t_matmul,
        "attention": accum * t_attn,
        "comm_exposed": accum * exposed,
        "ulysses_a2a": accum * t_uly,
        "ring_total": accum * t_ring_total,
        "ring_exposed": accum * t_ring_exposed,
        "fsdp": accum * t_fsdp,
        "dp_allreduce": accum * t_dp,
        "mmsp_routing": accum * t_route,
    }
    tokens = rows_step * work.seq_len
    mfu = accum * fl.model_flops / (n * peak * step) if step else 0.0
    return Prediction(c, accum, mem, time, tokens / step, mfu, tuple(reasons), tuple(notes))


def micro_row_options(work: Workload, groups: int, grad_accum: int | None = None) -> list[int]:
    """Rows per batch group per micro-batch worth trying: divisors of the group's rows (the one
    that ``grad_accum`` micro-batches imply when it is fixed)."""
    if work.global_rows is None or work.global_rows % groups:
        return [1]
    per_group = work.global_rows // groups
    if grad_accum is not None:
        return [per_group // grad_accum] if per_group % grad_accum == 0 else [1]
    return [m for m in range(1, min(per_group, MAX_MICRO_ROWS) + 1) if per_group % m == 0]


def enumerate_plans(
    work: Workload,
    cluster: Cluster,
    *,
    remats: tuple[str, ...] = REMATS,
    block_size: int = 1,
    block_kernel: str = "pallas",
    grad_accum: int | None = None,
) -> list[Prediction]:
    """Every candidate on ``cluster.devices`` devices, valid ones first, fastest first.

    Args:
      work, cluster: what is trained and where.
      remats: the remat policies to try; block_size: the mesh's block size.
      block_kernel: "pallas" (GPU: no score temporaries) or "xla" (``plan.memory``).
      grad_accum: fix the micro-batches per step (the trainer's stage does); None tries every
        split of the batch.

    Returns:
      Predictions sorted by (number of reasons against, -tokens/s, memory): the valid ones
      first, fastest first.
    """
    out = []
    for data, fsdp, ring, uly in factorisations(cluster.devices):
        for remat in remats:
            for micro in micro_row_options(work, data * fsdp, grad_accum):
                for zero_sp in (False, True) if ring * uly > 1 else (False,):
                    c = Candidate(data, fsdp, ring, uly, remat, micro, block_size, zero_sp)
                    out.append(predict(work, cluster, c, block_kernel, grad_accum))
    out.sort(key=lambda p: (len(p.reasons), -p.tokens_per_s, p.memory["total"]))
    return out


def check_with_mesh(work: Workload, cluster: Cluster, c: Candidate) -> str | None:
    """The project's own verdict (``parallel.mesh.validate_mesh``) on a candidate's shapes:
    None when it accepts them, else its message (tests hold the planner to the same answer)."""
    try:
        validate_mesh(
            c.mesh_config(),
            cluster.devices,
            num_heads=work.model.llm.num_attention_heads,
            num_kv_heads=work.model.llm.num_key_value_heads,
            seq_len=work.seq_len,
            batch_size=work.global_rows,
            devices_per_process=cluster.devices_per_node,
        )
    except ConfigError as err:
        return str(err)
    return None


def best(predictions: list[Prediction]) -> Prediction:
    """The fastest valid prediction.

    Raises:
      ConfigError: none is valid (the message gives the closest one's reasons).
    """
    for p in predictions:
        if p.valid:
            return p
    closest = min(predictions, key=lambda p: len(p.reasons))
    raise ConfigError("mesh", f"no valid mesh; e.g. {closest.candidate}: {closest.reasons[0]}")


__all__ = [
    "REMATS",
    "Candidate",
    "Prediction",
    "best",
    "check_with_mesh",
    "enumerate_plans",
    "factorisations",
    "predict",
    "structural_reasons",
]
