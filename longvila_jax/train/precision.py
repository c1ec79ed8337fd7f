"""The dtype policy of a stage (``StageConfig.precision``), as upstream trains.

Upstream LongVILA trains with DeepSpeed bf16 + ZeRO (NVlabs/VILA@b760c34: the
``longvila/train/*.sh`` launchers pass ``--bf16 True --deepspeed ./scripts/zero2.json``, whose
``"bf16": {"enabled": "auto"}`` follows that flag; ``llava/train/train_llm_to_long.py`` loads the
model in ``torch.bfloat16``): the module runs its forward and backward in bf16, while the
optimizer keeps fp32 master copies of the trainable weights and fp32 Adam moments, and the
updated masters are cast back for the next forward. At lr 1e-5..1e-4 most
AdamW updates lie below bf16's resolution (2^-8 relative), so updating bf16 weights directly
loses them; the fp32 masters keep them.

Where each dtype lives:

- trainable parameters and LoRA adapters in the train state: ``precision.params`` (float32);
  the AdamW moments follow them (optax creates them like the parameters);
- frozen parameters in the train state: ``precision.frozen`` (null: the model's
  ``param_dtype``);
- the forward/backward: ``precision.compute`` (null: the model's ``compute_dtype``). The step
  casts every parameter to it before it builds the model (:func:`to_compute`), so the gradient
  reaching an fp32 master comes back through that cast in fp32; micro-batch gradients are
  summed in fp32 and handed to the optimizer in fp32;
- the training checkpoints hold the state as it is (fp32 masters and moments: a resume is
  bit-exact); the stage's ``final/`` and its VILA export hold the model's ``param_dtype``
  (``train.finish``), as upstream releases its bf16 checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import PrecisionConfig


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
    """The resolved dtypes of one stage (every field set; ``PrecisionConfig`` nulls filled).

    Attributes:
      params: the trainable parameters (masters), the LoRA adapters and the AdamW moments.
      compute: the forward and backward.
      frozen: the frozen parameters in the train state.
      stored: the model config's ``param_dtype``: what ``final/`` and the export hold.
    """

    params: str
    compute: str
    frozen: str
    stored: str

    @classmethod
    def of(cls, precision: PrecisionConfig, model: ModelConfig) -> DtypePolicy:
        return cls(
            params=precision.params,
            compute=precision.compute or model.compute_dtype,
            frozen=precision.frozen or model.param_dtype,
            stored=model.param_dtype,
        )


def forward_config(model: ModelConfig, policy: DtypePolicy) -> ModelConfig:
    """The config of the model the step builds: ``model`` computing in ``policy.compute``.

    Only the train step's template uses it; the stage's model config (written to ``final/``)
    keeps its own ``compute_dtype``.
    """
    if model.compute_dtype == policy.compute:
        return model
    return dataclasses.replace(model, compute_dtype=policy.compute)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype`` (a no-op for leaves already in it).

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (abstract states).
    """
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def to_compute(flat: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """Flat params cast to the compute dtype (inside the loss: the cast's gradient brings the
    compute-dtype cotangent back to each master's own dtype)."""
    return cast_floating(dict(flat), dtype)


__all__ = ["DtypePolicy", "cast_floating", "forward_config", "to_compute"]
