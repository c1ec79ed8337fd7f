"""Shared helpers of the evaluation tests (a uniquely named module: every test directory has its
own ``conftest``, so tests must not import helpers from ``conftest``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from longvila_jax.config.model import ModelConfig
from longvila_jax.models import LongVILA

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/model/tiny-qwen2.yaml"


def make_model(cfg: ModelConfig, seed: int = 0) -> LongVILA:
    """A LongVILA with random weights filled in numpy: norms 1, biases 0, other weights
    N(0, 1 / fan_in). Much faster than the eager NNX initialisation (no per-op compiles),
    and the evaluation code does not care how the weights were drawn."""
    import jax
    import jax.numpy as jnp

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias":
            return jnp.zeros(x.shape, x.dtype)
        fan_in = x.shape[-2] if len(x.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(x.shape) * fan_in**-0.5, x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
