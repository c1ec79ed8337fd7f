"""VILA ``mm_projector`` tensor names <-> ``models.projector.Projector`` parameter paths.

VILA's projector is an ``nn.Sequential`` named ``layers`` (``base_projector.py``), so tensors
are ``layers.<slot>.{weight,bias}`` with parameter-free slots (downsample, GELU) skipped. The
``linear`` projector's ``layers`` is the ``nn.Linear`` itself: ``layers.weight``.
"""

from __future__ import annotations

from longvila_jax.ckpt.mappings import Rule


def _linear(prefix: str, module: str) -> tuple[Rule, ...]:
    return (
        Rule(prefix + ".weight", (module, "kernel"), "transpose"),
        Rule(prefix + ".bias", (module, "bias")),
    )


def _norm(prefix: str, module: str) -> tuple[Rule, ...]:
    return (Rule(prefix + ".weight", (module, "scale")), Rule(prefix + ".bias", (module, "bias")))


_DOWNSAMPLE_2X2 = (
    *_norm("layers.1", "norm"),
    *_linear("layers.2", "fc1"),
    *_linear("layers.4", "fc2"),
)

# mm_projector_type -> rules. Slots: 0 downsample, 1 LN, 2 Linear, 3 GELU, 4 Linear (2x2);
# 0 downsample, 1 LN, 2 Linear, 3 GELU, 4 LN, 5 Linear, 6 GELU, 7 Linear (3x3).
RULES: dict[str, tuple[Rule, ...]] = {
    "mlp_downsample": _DOWNSAMPLE_2X2,
    "mlp_downsample_2x2_fix": _DOWNSAMPLE_2X2,
    "mlp_downsample_3x3_fix": (
        *_norm("layers.1", "norm1"),
        *_linear("layers.2", "fc1"),
        *_norm("layers.4", "norm2"),
        *_linear("layers.5", "fc2"),
        *_linear("layers.7", "fc3"),
    ),
    "mlp2x_gelu": (*_linear("layers.0", "fc1"), *_linear("layers.2", "fc2")),
    "linear": _linear("layers", "fc"),
}

UNUSED: tuple[str, ...] = ()
