"""HF SigLIP vision-tower tensor names <-> ``models.vision.VisionTower`` parameter paths.

Names are those of transformers 5 (no ``vision_model.`` prefix); ``longvila_jax.ckpt.mapping``
also accepts the legacy prefixed spelling that VILA releases use. Encoder layers at or beyond
``vision.layers_used``, ``post_layernorm`` and the attention-pool ``head`` do not influence
``hidden_states[select_layer]``; they are "unused" (kept verbatim by the converter).
"""

from __future__ import annotations

from longvila_jax.ckpt.mappings import Rule

PREFIX = "vision_model."

_L = "encoder.layers.{layer}."
_P = ("encoder", "layers")

RULES: tuple[Rule, ...] = (
    Rule(
        "embeddings.patch_embedding.weight",
        ("embeddings", "patch_embedding", "kernel"),
        "conv_oihw_to_hwio",
    ),
    Rule("embeddings.patch_embedding.bias", ("embeddings", "patch_embedding", "bias")),
    Rule("embeddings.position_embedding.weight", ("embeddings", "position_embedding", "embedding")),
    Rule(_L + "layer_norm1.weight", (*_P, "layer_norm1", "scale")),
    Rule(_L + "layer_norm1.bias", (*_P, "layer_norm1", "bias")),
    Rule(_L + "layer_norm2.weight", (*_P, "layer_norm2", "scale")),
    Rule(_L + "layer_norm2.bias", (*_P, "layer_norm2", "bias")),
    Rule(_L + "self_attn.q_proj.weight", (*_P, "self_attn", "q_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.k_proj.weight", (*_P, "self_attn", "k_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.v_proj.weight", (*_P, "self_attn", "v_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.out_proj.weight", (*_P, "self_attn", "out_proj", "kernel"), "transpose"),
    Rule(_L + "self_attn.q_proj.bias", (*_P, "self_attn", "q_proj", "bias")),
    Rule(_L + "self_attn.k_proj.bias", (*_P, "self_attn", "k_proj", "bias")),
    Rule(_L + "self_attn.v_proj.bias", (*_P, "self_attn", "v_proj", "bias")),
    Rule(_L + "self_attn.out_proj.bias", (*_P, "self_attn", "out_proj", "bias")),
    Rule(_L + "mlp.fc1.weight", (*_P, "mlp", "fc1", "kernel"), "transpose"),
    Rule(_L + "mlp.fc1.bias", (*_P, "mlp", "fc1", "bias")),
    Rule(_L + "mlp.fc2.weight", (*_P, "mlp", "fc2", "kernel"), "transpose"),
    Rule(_L + "mlp.fc2.bias", (*_P, "mlp", "fc2", "bias")),
)

# Present in real towers, never on the path to hidden_states[-2].
UNUSED: tuple[str, ...] = (r"post_layernorm\..+", r"head\..+")
