"""HF Llama / Qwen2 causal-LM tensor names <-> ``models.llm.LLM`` parameter paths.

Torch ``nn.Linear`` weights are [out, in]; our kernels are [in, out] ("transpose"). Norm
weights, biases and the embedding table keep their layout.
"""

from __future__ import annotations

from longvila_jax.ckpt.mappings import Rule

_L = "model.layers.{layer}."

RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    Rule(_L + "input_layernorm.weight", ("layers", "input_layernorm", "scale")),
    Rule(_L + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale")),
    Rule(_L + "self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.q_proj.bias", ("layers", "self_attn", "q_proj", "bias")),
    Rule(_L + "self_attn.k_proj.bias", ("layers", "self_attn", "k_proj", "bias")),
    Rule(_L + "self_attn.v_proj.bias", ("layers", "self_attn", "v_proj", "bias")),
    Rule(_L + "self_attn.o_proj.bias", ("layers", "self_attn", "o_proj", "bias")),
    Rule(_L + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), "transpose"),
    Rule(_L + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), "transpose"),
    Rule(_L + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), "transpose"),
    Rule(_L + "mlp.gate_proj.bias", ("layers", "mlp", "gate_proj", "bias")),
    Rule(_L + "mlp.up_proj.bias", ("layers", "mlp", "up_proj", "bias")),
    Rule(_L + "mlp.down_proj.bias", ("layers", "mlp", "down_proj", "bias")),
    Rule("model.norm.weight", ("norm", "scale")),
    # A tied model reads its output head from the embedding table; a stray copy is harmless.
    Rule("lm_head.weight", ("lm_head", "kernel"), "transpose", if_absent="unused"),
)

# Tensors real checkpoints may carry that the model recomputes (old Llama rotary buffers).
UNUSED: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
