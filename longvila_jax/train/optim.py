"""Optimizer and learning-rate schedule of a stage: optax AdamW, warmup + cosine or constant.

Gradient clipping is by global norm (VILA/HF ``max_grad_norm``); the norm itself is measured in
``step.py`` before clipping so that the logged value is the raw one. Gradient accumulation is not
an optax wrapper here: the jitted step sums micro-batch gradients itself, so the loss stays the
exact token mean over the whole accumulated batch.

Dtypes (``train.precision``): optax creates the AdamW moments like the parameters it is given
(``mu_dtype`` unset), and the state hands it the fp32 masters, so the moments are fp32 as
DeepSpeed keeps them; the step feeds it fp32 gradients and keeps each state leaf's dtype.

Module LRs (``vision_tower_lr``, ``mm_projector_lr``): upstream puts the tower or the projector
in its own torch parameter group with its own LR; HF's scheduler multiplies every group's LR by
the same warmup/decay factor and AdamW applies ``-lr_group * (adam + wd * p)``. Scaling the
final AdamW update of those leaves by ``lr_group / lr`` is therefore the same update, with one
optimizer state over all leaves (clipping stays global, as upstream's ``max_grad_norm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from longvila_jax.config.train import OptimConfig

# Parameter-path prefixes of the modules with their own LR (paths as in the stage ``trainable``
# regexes; the optimizer's tree is {"params": ..., "lora": ...} above them).
MODULE_PREFIXES = {"vision_tower_lr": "vision/", "mm_projector_lr": "projector/"}


def make_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """LR as a function of the number of applied updates.

    Args:
      cfg: optimizer config.
      steps: total steps of the stage (cosine decays to ``end_lr_ratio * lr`` at ``steps``).

    Returns:
      An optax schedule (int step -> float LR).
    """
    warmup = min(cfg.warmup(steps), steps)
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.end_lr_ratio,
    )


def module_lr_factors(cfg: OptimConfig) -> dict[str, float]:
    """Path prefix -> LR factor relative to ``cfg.lr`` for the modules with their own LR."""
    return {
        prefix: getattr(cfg, field) / cfg.lr
        for field, prefix in MODULE_PREFIXES.items()
        if getattr(cfg, field) is not None and getattr(cfg, field) != cfg.lr
    }


def _leaf_name(path) -> str:
    """'/'-joined dict keys below the top level ({"params"|"lora": ...})."""
    return "/".join(str(getattr(k, "key", k)) for k in path[1:])


def scale_by_module(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of the leaves whose path starts with a prefix by its factor.

    Args:
      factors: path prefix (e.g. ``"vision/"``) -> factor; other leaves pass unchanged.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params

        def scale(path, u):
            name = _leaf_name(path)
            for prefix, factor in factors.items():
                if name.startswith(prefix):
                    return u * jnp.asarray(factor, u.dtype)
            return u

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after optional global-norm clipping, then the module LR
    factors (:func:`module_lr_factors`; absent unless a module LR differs from ``lr``, so the
    state of a config without them is unchanged)."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=make_schedule(cfg, steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    factors = module_lr_factors(cfg)
    if factors:
        parts.append(scale_by_module(factors))
    return optax.chain(*parts)


__all__ = [
    "MODULE_PREFIXES",
    "make_optimizer",
    "make_schedule",
    "module_lr_factors",
    "scale_by_module",
]
