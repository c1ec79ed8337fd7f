"""FLOPs of one training step from the model config (what the planner divides by achieved FLOP/s).

Formulas, per micro-batch of b rows of L tokens with F frames per row (a multiply-add = 2 FLOPs):

- LLM matmuls: 6 * N_llm * b * L, N_llm the LLM's matmul parameters per token (q, k, v, o,
  gate, up, down of every layer, plus the LM head; the embedding is a gather). 2 in the forward,
  4 in the backward (activation and weight gradients).
- LLM attention: the forward does QK^T and PV, 4 * L^2 * H * d per layer and row without a
  mask; the backward recomputes P (flash-style ``custom_vjp``, parallel/ring.py) and computes dV,
  dP, dQ, dK: 10 * L^2 * H * d. Causal halves both: 7 * layers * H * d * L^2 per row (the
  "12 * layers * h * d * t^2, halved for causal" rule plus the recomputed QK^T).
- Vision tower, per frame of P patches: 6 * N_layer * P per layer (its matmuls) and
  4 * P^2 * D_v (+ 2 for the recomputed scores in the backward, unmasked), over the layers that
  run (``VisionConfig.layers_used``), plus the projector's matmuls on P tokens. Frozen towers
  skip the weight gradients (4 -> 2 for the backward); the planner assumes a trained tower
  (stage 5 trains everything) unless told otherwise.
- Rematerialisation (``REMAT_EXTRA``): the forward run again in the backward, as a fraction of
  the forward, for matmuls and attention separately. ``nothing_saveable`` and
  ``save_attention`` redo both (the attention's fp32 LSE residual is not a named checkpoint, so
  JAX reruns the ring forward to get it), ``dots_with_no_batch_dims_saveable`` keeps the
  projections' outputs and redoes attention only, ``none`` redoes nothing.
"""

from __future__ import annotations

import dataclasses

from longvila_jax.config.model import ModelConfig

# (matmul, attention) forward passes recomputed in the backward, per remat policy.
REMAT_EXTRA: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0),
    "nothing_saveable": (1.0, 1.0),
    "save_attention": (1.0, 1.0),
    "dots_with_no_batch_dims_saveable": (0.0, 1.0),
    "dots_saveable": (0.0, 1.0),
    "everything": (0.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch, whole cluster (divide by devices for a device's share).

    Attributes:
      llm_matmul, llm_attention, vision: forward + backward + remat recompute.
      attention_fwd: the attention forward alone (sets the ring's per-step compute).
      model_flops: without remat recompute (the MFU numerator).
    """

    llm_matmul: float
    llm_attention: float
    vision: float
    attention_fwd: float
    model_flops: float

    @property
    def total(self) -> float:
        return self.llm_matmul + self.llm_attention + self.vision


def llm_matmul_params(model: ModelConfig) -> int:
    """Matmul parameters per token of the LLM (layers + LM head; the embedding is a gather)."""
    c = model.llm
    d = c.dim_per_head
    attn = c.hidden_size * d * (c.num_attention_heads + 2 * c.num_key_value_heads)
    attn += c.num_attention_heads * d * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size


def vision_flops_per_frame(model: ModelConfig, train_tower: bool = True) -> float:
    """Forward + backward FLOPs of the tower and projector for one frame (module docstring)."""
    v = model.vision
    p, dv = v.num_patches, v.hidden_size
    per_layer_params = 4 * dv * dv + 2 * dv * v.intermediate_size
    matmul_passes = 6 if train_tower else 4  # a frozen tower needs no weight gradient
    layers = v.layers_used
    matmul = matmul_passes * per_layer_params * p * layers
    attention = (4 + 10) * p * p * dv * layers  # unmasked: fwd 4, bwd 10 (recomputed P)
    m = model.projector.merge
    proj_in = dv * m * m
    proj = 6 * (proj_in * model.llm.hidden_size + model.llm.hidden_size**2) * (p / (m * m))
    return matmul + attention + proj


def step_flops(
    model: ModelConfig,
    *,
    seq_len: int,
    frames: int,
    rows: int,
    remat: str,
    train_tower: bool = True,
) -> StepFlops:
    """FLOPs of one micro-batch of ``rows`` rows (module docstring).

    Args:
      model: the model config; seq_len: tokens per row L; frames: frames per row F.
      rows: rows in the micro-batch (all devices); remat: the scanned layers' policy.
      train_tower: whether the vision tower gets weight gradients.
    """
    c = model.llm
    extra_mm, extra_attn = REMAT_EXTRA[remat]
    tokens = rows * seq_len
    n = llm_matmul_params(model)
    matmul = 6 * n * tokens
    attn_unit = c.num_hidden_layers * c.num_attention_heads * c.dim_per_head * seq_len**2 * rows
    attn_fwd = 2 * attn_unit  # 4 * L^2 * H * d, halved for causal
    attention = 7 * attn_unit
    vision = vision_flops_per_frame(model, train_tower) * frames * rows
    model_flops = matmul + attention + vision
    # Recompute: forward matmuls are a third of 6 N t; the vision tower is scanned with the
    # same policy.
    matmul_re = matmul + extra_mm * 2 * n * tokens
    attention_re = attention + extra_attn * attn_fwd
    vision_re = vision * (1 + extra_mm / 3)
    return StepFlops(matmul_re, attention_re, vision_re, attn_fwd, model_flops)


__all__ = ["REMAT_EXTRA", "StepFlops", "llm_matmul_params", "step_flops", "vision_flops_per_frame"]
