"""Analytic collective volumes: the single source for the planner and ``bench/comm_bytes.py``.

Every figure is *wire bytes sent per device* (what a device puts on its links), the unit
``bench/comm_bytes.py:hlo_collectives`` reads from compiled HLO: a tiled all-to-all or an
all-gather over n devices sends (n-1)/n of its result, a reduce-scatter (n-1)/n of its input,
a ring all-reduce 2(n-1)/n of its buffer, a collective-permute its whole buffer.

Attention (parallelism.md section 7), per attention layer, for this implementation
(``parallel.attention.make_mmsp_attention``): with N = R*U sequence devices, b rows of L tokens,
H query heads of dim d and H_kv' = H_kv * ``kv_replication(H, H_kv, U)`` KV heads after the
replication that Ulysses needs when U does not divide H_kv:

  Ulysses  e * b * (L/N) * (2*H*d + 2*H_kv'*d) * (U-1)/U      q, k, v in and o out (forward);
           the backward moves the same again (dO in; dQ, dK, dV out).
  ring     forward: R-1 hops of the stacked [K; V] block, 2 * e * b * L * H_kv'*d * (R-1)/N;
           backward: the same KV hops plus R hops of fp32 dK/dV (one-hop lag, then home),
           2 * e_acc * b * L * H_kv'*d * R/N. Segment ids and positions (int32) are left out.

Beyond attention (planner only; the HLO check covers attention):

  FSDP     all-gather of the layer weights in the forward and again in the backward (the
           scan re-gathers each layer), reduce-scatter of the gradients: per micro-batch.
  data     all-reduce of the (FSDP-sharded) gradients over the data axis. The step's
           accumulator is sharded like the parameters, so GSPMD reduces every micro-batch's
           gradient as it is produced, not once per step.
  TP       Megatron tensor parallelism: two all-reduces of [b, L/CP, D] activations per layer
           forward (after attention and after the MLP) and two in the backward.
  routing  MM-SP stage 2: two all-to-all hops of the visual tokens over the SP group.
"""

from __future__ import annotations

from longvila_jax.parallel.ulysses import kv_replication


def attention_bytes(
    b: int,
    seq: int,
    heads: int,
    kv_heads: int,
    dim: int,
    ring: int,
    ulysses: int,
    e: int,
    e_acc: int = 4,
) -> dict[str, float]:
    """Wire bytes per device of one MM-SP attention layer (module docstring).

    Args:
      b: rows; seq: tokens per row L; heads, kv_heads, dim: H, H_kv, d.
      ring, ulysses: R and U; e: bytes per activation element; e_acc: bytes of the dK/dV
        accumulators that travel in the backward (fp32: 4).

    Returns:
      ``fwd``, ``fwd_bwd`` (totals, as ``bench/comm_bytes.py`` compares with HLO) and their
      parts ``ulysses_fwd``, ``ring_fwd``, ``ring_bwd`` (the backward's ring bytes alone).
    """
    n = ring * ulysses
    dkv = kv_heads * kv_replication(heads, kv_heads, ulysses) * dim
    uly = e * b * (seq / n) * (2 * heads * dim + 2 * dkv) * (ulysses - 1) / ulysses
    ring_fwd = 2 * e * b * seq * dkv * (ring - 1) / n
    ring_bwd = ring_fwd + 2 * e_acc * b * seq * dkv * (ring if ring > 1 else 0) / n
    return {
        "fwd": uly + ring_fwd,
        "fwd_bwd": 2 * uly + ring_fwd + ring_bwd,
        "ulysses_fwd": uly,
        "ring_fwd": ring_fwd,
        "ring_bwd": ring_bwd,
    }


def ring_hop_bytes(b: int, seq: int, kv_dim: int, ring: int, ulysses: int, e: int, e_acc: int):
    """Bytes of one ring hop per device: (forward KV block, backward KV + dK/dV block).

    A hop carries the ring rank's whole block, L/R tokens, on this device's H_kv'/U heads
    (``kv_dim`` = H_kv' * d, the replicated KV width).
    """
    tokens = seq / ring
    fwd = 2 * e * b * tokens * kv_dim / ulysses
    return fwd, fwd + 2 * e_acc * b * tokens * kv_dim / ulysses


def fsdp_bytes(param_bytes_full: float, grad_bytes_full: float, fsdp: int) -> dict[str, float]:
    """Wire bytes per device per micro-batch of FSDP over ``fsdp`` devices.

    Args:
      param_bytes_full: bytes of the gathered (unsharded) parameters in the dtype gathered.
      grad_bytes_full: bytes of the unsharded gradients in the dtype reduced.
      fsdp: the FSDP degree.
    """
    frac = (fsdp - 1) / fsdp
    return {"all_gather": 2 * param_bytes_full * frac, "reduce_scatter": grad_bytes_full * frac}


def allreduce_bytes(buffer_bytes: float, n: int) -> float:
    """Wire bytes per device of a ring all-reduce of ``buffer_bytes`` over n devices."""
    return 2 * buffer_bytes * (n - 1) / n if n > 1 else 0.0


def tp_bytes(b: int, seq_local: int, hidden: int, tp: int, e: int) -> dict[str, float]:
    """Megatron TP activation all-reduces per layer: 2 forward, 2 backward, each of a
    [b, seq_local, hidden] activation (``seq_local`` = L / CP)."""
    one = allreduce_bytes(e * b * seq_local * hidden, tp)
    return {"fwd": 2 * one, "fwd_bwd": 4 * one}


def routing_bytes(local_visual: int, hidden: int, sp: int, e: int) -> float:
    """MM-SP stage 2: two all-to-all hops of a device's ``local_visual`` visual tokens of
    width ``hidden`` over the SP group (forward; the backward moves the same back)."""
    return 2 * e * local_visual * hidden * (sp - 1) / sp if sp > 1 else 0.0


__all__ = [
    "allreduce_bytes",
    "attention_bytes",
    "fsdp_bytes",
    "ring_hop_bytes",
    "routing_bytes",
    "tp_bytes",
]
