"""Optimizer and learning-rate schedule of a stage: optax AdamW, warmup + cosine or constant.

Gradient clipping is by global norm (VILA/HF ``max_grad_norm``); the norm itself is measured in
``step.py`` before clipping so that the logged value is the raw one. Gradient accumulation is not
an optax wrapper here: the jitted step sums micro-batch gradients itself, so the loss stays the
exact token mean over the whole accumulated batch.

Dtypes (``train.precision``): optax creates the AdamW moments like the parameters it is given
(``mu_dtype`` unset), and the state hands it the fp32 masters, so the moments are fp32 as
DeepSpeed keeps them; the step feeds it fp32 gradients and keeps each state leaf's dtype.
"""

from __future__ import annotations

import optax

from longvila_jax.config.train import OptimConfig


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


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after optional global-norm clipping."""
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
    return optax.chain(*parts)


__all__ = ["make_optimizer", "make_schedule"]
