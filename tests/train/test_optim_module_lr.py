"""Module learning rates (upstream's ``vision_tower_lr`` / ``mm_projector_lr`` parameter groups).

The reference is a hand-written numpy AdamW with torch/HF semantics: global-norm clipping over
every group, then per group ``p -= lr_group * sched(t) * (m_hat / (sqrt(v_hat) + eps) + wd * p)``
(``llava/train/llava_trainer.py`` builds the groups; HF's LambdaLR scales every group's LR by
the same factor).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longvila_jax.config.base import ConfigError
from longvila_jax.config.train import OptimConfig
from longvila_jax.train.optim import make_optimizer, make_schedule


def _tree(rng):
    return {
        "params": {
            "vision": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
            "projector": {"w": rng.normal(size=(4,)).astype(np.float32)},
            "llm": {"w": rng.normal(size=(2, 5)).astype(np.float32)},
        }
    }


def _reference(cfg: OptimConfig, steps: int, params, grads_seq, group_lr):
    """numpy AdamW over named groups, torch semantics (bias-corrected moments, decoupled wd)."""
    sched = make_schedule(dataclasses.replace(cfg, lr=1.0), steps)  # the shared LR factor
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads_seq):
        norm = np.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum()) for x in g.values()))
        clip = min(1.0, cfg.clip_norm / max(norm, 1e-30)) if cfg.clip_norm else 1.0
        factor = float(sched(t))
        for k in p:
            gk = np.asarray(g[k], np.float64) * clip
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
            v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * gk**2
            m_hat = m[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = v2[k] / (1 - cfg.b2 ** (t + 1))
            lr = group_lr[k.split("/")[0]] * factor
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * p[k])
    return p


def _flat(tree):
    return {module: leaves["w"] for module, leaves in tree["params"].items()}


@pytest.mark.parametrize("vision_lr, projector_lr", [(1e-3, None), (0.0, 5e-2), (None, 2e-3)])
def test_module_lrs_match_torch_param_groups(vision_lr, projector_lr):
    rng = np.random.default_rng(0)
    cfg = OptimConfig(
        lr=1e-2,
        schedule="cosine",
        warmup_steps=1,
        weight_decay=0.1,
        clip_norm=1.0,
        vision_tower_lr=vision_lr,
        mm_projector_lr=projector_lr,
    )
    steps = 4
    params = _tree(rng)
    grads_seq = [_tree(rng) for _ in range(steps)]
    opt = make_optimizer(cfg, steps)
    state = opt.init(params)
    current = jax.tree.map(jnp.asarray, params)
    for g in grads_seq:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, current)
        current = optax.apply_updates(current, updates)
    group_lr = {
        "vision": cfg.lr if vision_lr is None else vision_lr,
        "projector": cfg.lr if projector_lr is None else projector_lr,
        "llm": cfg.lr,
    }
    want = _reference(cfg, steps, _flat(params), [_flat(g) for g in grads_seq], group_lr)
    got = {k: np.asarray(v) for k, v in _flat(current).items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    if vision_lr == 0.0:  # a zero module LR leaves the module exactly where it was
        np.testing.assert_array_equal(got["vision"], params["params"]["vision"]["w"])
    # The groups really differ: the same run without module LRs ends elsewhere.
    plain = _reference(cfg, steps, _flat(params), [_flat(g) for g in grads_seq], {
        "vision": cfg.lr, "projector": cfg.lr, "llm": cfg.lr,
    })  # fmt: skip
    moved = "vision" if vision_lr is not None else "projector"
    assert np.abs(plain[moved] - want[moved]).max() > 1e-4


def test_no_module_lr_keeps_the_optimizer_state_layout():
    """Configs without module LRs keep the state tree of clip + AdamW (old checkpoints load)."""
    cfg = OptimConfig(lr=1e-3, vision_tower_lr=1e-3)  # equal to lr: no factor, no extra state
    params = _tree(np.random.default_rng(1))
    base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(make_schedule(cfg, 4)))
    got = jax.tree_util.tree_structure(make_optimizer(cfg, 4).init(params))
    assert got == jax.tree_util.tree_structure(base.init(params))
    scaled = make_optimizer(OptimConfig(lr=1e-3, vision_tower_lr=1e-4), 4).init(params)
    assert jax.tree_util.tree_structure(scaled) != got


@pytest.mark.parametrize("field", ["vision_tower_lr", "mm_projector_lr"])
@pytest.mark.parametrize("value", [-1e-4, float("nan"), float("inf")])
def test_bad_module_lr_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        OptimConfig(**{field: value})
    assert err.value.field == field
