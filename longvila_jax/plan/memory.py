"""Per-device memory of one MM-SP train step, component by component.

The planner sums these terms for a candidate mesh and compares the total with the device's
budget. ``tests/plan/test_memory_model.py`` holds the sum within 15% of what XLA reserves for
the real step (``plan.witness``: argument + temp bytes of ``memory_analysis()``) on simulated
CPU devices; the terms follow the step as ``train/step.py`` writes it.

Notation: P_t, P_f trainable / frozen parameters held by the device (after FSDP sharding),
P_g the parameters gathered for compute (unsharded when fsdp > 1), A micro-batches, b rows per
device group, T = b * L / SP tokens per device, c = L / R tokens of a ring block, h = H / U and
h_kv = H_kv' / U heads per device after the Ulysses all-to-all, e compute bytes.

Arguments (exact: the train state and the batch as the step receives them):

- params      P_t * 4 (fp32 masters) + P_f * frozen bytes.
- optimizer   2 * P_t * 4 (AdamW moments).
- batch       the micro-batches' int32 token arrays and fp32 frames.

Temporaries come in two phases that XLA never keeps alive together (its buffer assignment
reuses one phase's memory for the other), so the total is arguments + max(update, backward):

- gradients   (update phase) ``UPDATE_COPIES`` * P_t * 4: the fp32 gradient sum, the new
              moments and parameters beside the donated state until the guarded select
              (``train.step._select``).
- backward phase, the sum of:
  - gathered    with parameters sharded (fsdp, or ZeRO over the SP axes) the layer scan's
                weights are gathered one layer at a time in the compute dtype, P_layer * e,
                while the embedding and the LM head (outside the scan) are gathered whole with
                whole compute-dtype gradients, 2 * P_vocab * e (6.5 GB per device for
                Qwen2-7B: ``bench/scale_witness.py``); the compute-dtype cast copy P * e when
                it is narrower than the masters; the fp32 accumulator P_t * 4 when A > 1.
  - activations the layer scans' saved residuals, per token and layer ``saved_per_token``
                (remat policy), for the LLM on T tokens and the tower on its frames' patches,
                plus ``FULL_LAYERS`` layers' full residuals while one is recomputed and
                differentiated.
  - attention   q, k, v, o, dO, dQ in the head layout; the ring's buffers in flight (KV twice,
                fp32 dK/dV twice, fp32 dQ^T). XLA block kernels add fp32 score temporaries
                S = [b, h, c, kv_chunk]: ``SCORE_BUFFERS`` of them, and ``RING_STEP_BUFFERS``
                more per ring step of the forward and backward loops (2R - 3 steps for
                R >= 2), which XLA:CPU keeps alive across the loop; a fused Pallas kernel on a
                GPU keeps only tiles (0).
  - logits      the chunked cross-entropy: ``LOGIT_COPIES`` * [b, ce_chunk, V] fp32.
  - whole grads with parameters sharded, the trainable parameters that no rule splits (a
                dimension the shard count does not divide) get whole fp32 gradients:
                ``WHOLE_GRAD_COPIES`` * P_whole * 4 (the gradient and its all-reduce buffer)
                while the sharded ones are reduce-scattered layer by layer. The 256-device
                witness of ``bench/scale_witness.py`` showed it (SigLIP's 415M parameters
                whole on every device: 3.1 GiB); without parameter sharding the update
                phase's copies cover the gradients (the 8-device fit).

The coefficients in capitals are fitted once to the compiled step at tiny dims (the structure
is fixed by the step; ``tests/plan/test_memory_model.py`` checks held-out shapes).
"""

from __future__ import annotations

import dataclasses
import math

from longvila_jax.config.model import ModelConfig
from longvila_jax.parallel.ulysses import kv_replication

# Least-squares fit of the relative error over 20 compiled steps (8 CPU devices, 4 meshes, the 4
# remat policies, 128-2048 tokens, 0-16 frames, grad_accum 1-2; bench/RESULTS.md, issue 15):
# whole copies of the fp32 trainable parameters in the update phase, full-residual
# layers alive in the backward, score-sized buffers, logits-chunk copies.
UPDATE_COPIES = 3.1
FULL_LAYERS = 1.1
SCORE_BUFFERS = 5.9
RING_STEP_BUFFERS = 6.1
LOGIT_COPIES = 12.0
# Whole fp32 gradients of unsplit trainable parameters under parameter sharding: the
# 256-device Qwen2-7B witness's constant (3.11 GiB = 2.01 x 4 B x 414.6M; bench/RESULTS.md).
WHOLE_GRAD_COPIES = 2.0
CE_CHUNK = 1024
KV_CHUNK = 512


def saved_per_token(
    model: ModelConfig, remat: str, e: int, llm: bool = True
) -> tuple[float, float]:
    """(bytes the layer scan keeps per token and layer under ``remat``, bytes of every residual
    of one layer) for an LLM or a vision layer.

    ``none`` keeps every residual of the layer's backward: the input and both norms' inputs in
    fp32, the normed activations, q/k/v and the attention output (twice with Ulysses: before
    and after the all-to-all), the MLP's gate, up, activation and product; the other policies
    keep the scan carry (the layer input) plus what they name.
    """
    if llm:
        c = model.llm
        dim, ffn, d = c.hidden_size, c.intermediate_size, c.dim_per_head
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
        attn_out = c.num_attention_heads * d
    else:
        v = model.vision
        dim, ffn = v.hidden_size, v.intermediate_size
        qkv, attn_out = 3 * dim, dim
    full = e * (4 * dim + 2 * qkv + 2 * attn_out + 4 * ffn) + 4 * 3 * dim
    saved = {
        "none": full,
        "everything": full,
        "nothing_saveable": e * dim,
        "save_attention": e * (dim + attn_out),
        "dots_with_no_batch_dims_saveable": e * (3 * dim + qkv + 2 * ffn),
        "dots_saveable": e * (3 * dim + qkv + 2 * ffn),
    }
    return float(saved[remat]), float(full)


@dataclasses.dataclass(frozen=True)
class MemoryInputs:
    """What the memory model needs about one candidate (sizes per device unless noted).

    Attributes:
      trainable, frozen: parameters held by the device (after FSDP sharding), elements.
      total_params: all parameters (unsharded), elements.
      frozen_bytes: bytes per frozen element; compute_bytes: e.
      fsdp: devices a parameter is sharded over; ring, ulysses: mesh degrees.
      rows: rows per device group per micro-batch (b).
      seq_len, frames: per row; grad_accum: micro-batches A; remat: policy name.
      block_kernel: "xla" (score temporaries) or "pallas" (tiles only).
      whole_trainable: trainable elements no rule splits (part of ``trainable``).
    """

    trainable: float
    frozen: float
    total_params: float
    frozen_bytes: int
    compute_bytes: int
    fsdp: int
    ring: int
    ulysses: int
    rows: int
    seq_len: int
    frames: int
    grad_accum: int
    remat: str
    block_kernel: str = "xla"
    whole_trainable: float = 0.0


def memory_breakdown(model: ModelConfig, m: MemoryInputs) -> dict[str, float]:
    """Per-device bytes of one train step by component (module docstring).

    Args:
      model: the model config (dims); m: the candidate's sizes.

    Returns:
      Component -> bytes; ``total`` = arguments + max(update phase, backward phase), the two
      phases that never overlap (module docstring).
    """
    c = model.llm
    e = m.compute_bytes
    sp = m.ring * m.ulysses
    tokens = m.rows * m.seq_len / sp
    out: dict[str, float] = {}
    out["params"] = 4 * m.trainable + m.frozen_bytes * m.frozen
    out["optimizer"] = 8 * m.trainable
    frames_local = m.rows * math.ceil(m.frames / sp) if m.frames else 0
    frame_px = model.vision.image_size**2 * 3 * 4
    out["batch"] = m.grad_accum * (5 * 4 * tokens + frame_px * frames_local)
    out["gradients"] = UPDATE_COPIES * 4 * m.trainable
    gathered = 0.0
    if m.fsdp > 1:
        # One layer's gathered weights (the matmuls' share of a layer), and the embedding and
        # LM head whole with their whole compute-dtype gradients (they live outside the scan).
        d = c.dim_per_head
        attn = c.hidden_size * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        vocab = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        gathered = e * (attn + 3 * c.hidden_size * c.intermediate_size) + 2 * e * vocab
    if e < 4:  # the compute-dtype copy of the (local) parameters
        gathered += e * (m.trainable + m.frozen)
    if m.grad_accum > 1:  # the accumulator lives through every micro-batch's backward
        gathered += 4 * m.trainable
    out["gathered"] = gathered
    # Activations: the LLM scan on the device's tokens, the tower scan on its frames' patches.
    saved, full = saved_per_token(model, m.remat, e)
    llm_act = tokens * (c.num_hidden_layers * saved + FULL_LAYERS * full)
    patches = frames_local * model.vision.num_patches
    v_saved, v_full = saved_per_token(model, m.remat, e, llm=False)
    vision_act = patches * (model.vision.layers_used * v_saved + FULL_LAYERS * v_full)
    out["activations"] = llm_act + vision_act
    # Attention: head-layout copies and the ring's buffers in flight.
    d = c.dim_per_head
    # A Ulysses degree that does not divide the heads is invalid anyway (search.py says why);
    # its memory is still reported, without replication.
    rep = 1
    if c.num_attention_heads % m.ulysses == 0:
        rep = kv_replication(c.num_attention_heads, c.num_key_value_heads, m.ulysses)
    kv_heads = c.num_key_value_heads * rep
    h, h_kv = c.num_attention_heads / m.ulysses, kv_heads / m.ulysses
    block = m.rows * m.seq_len / m.ring  # tokens of a ring block on this device's heads
    heads_layout = e * block * d * (4 * h + 2 * h_kv)  # q, o, dO, dQ + k, v
    kv_block = 2 * block * h_kv * d
    in_flight = kv_block * (2 * e + 2 * 4) + 4 * block * h * d if m.ring > 1 else 0.0
    scores = 0.0
    if m.block_kernel == "xla":
        cols = min(KV_CHUNK, max(1, m.seq_len // (2 * m.ring)))
        steps = max(0, 2 * m.ring - 3)
        scores = (SCORE_BUFFERS + RING_STEP_BUFFERS * steps) * 4 * block * h * cols
    out["attention"] = heads_layout + in_flight + scores
    out["logits"] = (
        LOGIT_COPIES * 4 * m.rows * min(CE_CHUNK, tokens / max(m.rows, 1)) * c.vocab_size
    )
    out["whole_grads"] = WHOLE_GRAD_COPIES * 4 * m.whole_trainable if m.fsdp > 1 else 0.0
    backward = sum(
        out[k] for k in ("gathered", "activations", "attention", "logits", "whole_grads")
    )
    arguments = out["params"] + out["optimizer"] + out["batch"]
    out["total"] = arguments + max(out["gradients"], backward)
    return out


__all__ = ["MemoryInputs", "memory_breakdown", "saved_per_token"]
