"""Model-config overrides for one evaluation run: RoPE as upstream V-NIAH measured it.

Upstream's V-NIAH forward for Qwen2 (``llava/eval/vision_niah_vila/zigzag_ring_attn/
modeling_qwen2.py``) builds its rotary embedding from ``rope_theta`` alone and ignores
``rope_scaling``, so the 1M release (linear factor 4) was measured with positions not divided
by 4; ``eval_vision_niah.py --rope_theta`` replaces theta when loading. Here both are config
overrides (``llm.rope_scaling=null``, ``llm.rope_theta=X``) applied to a loaded model: the
same parameters under a rebuilt ``ModelConfig``; the model code is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from longvila_jax.config.base import apply_overrides, to_dict
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.errors import ConfigError
from longvila_jax.models import LongVILA


def rope_overrides(ignore_rope_scaling: bool, rope_theta: float | None) -> list[str]:
    """The dotted overrides of the two options (empty when neither is set).

    Raises:
      ConfigError(``rope_theta``): a non-positive theta.
    """
    out = ["llm.rope_scaling=null"] if ignore_rope_scaling else []
    if rope_theta is not None:
        if not rope_theta > 0:
            raise ConfigError("rope_theta", f"must be positive, got {rope_theta}")
        out.append(f"llm.rope_theta={float(rope_theta)!r}")
    return out


def with_config_overrides(model: LongVILA, overrides: Sequence[str]) -> LongVILA:
    """``model``'s parameters under its config with ``overrides`` applied; ``model`` itself
    when there are none. Only fields that leave every parameter shape unchanged make sense
    (the RoPE ones); a shape change is refused.

    Raises:
      ConfigError: a bad override (named) or one that changes parameter shapes.
    """
    if not overrides:
        return model
    cfg = apply_overrides(ModelConfig, to_dict(model.cfg), overrides)
    graphdef, state = nnx.split(model)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))
    new_graphdef, new_state = nnx.split(abstract)
    old, new = nnx.to_pure_dict(state), nnx.to_pure_dict(new_state)
    same = jax.tree.structure(old) == jax.tree.structure(new) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
    )
    if not same:
        raise ConfigError(",".join(overrides), "overrides must not change parameter shapes")
    del graphdef
    nnx.replace_by_pure_dict(new_state, old)
    return nnx.merge(new_graphdef, new_state)


__all__ = ["rope_overrides", "with_config_overrides"]
