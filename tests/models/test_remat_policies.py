"""Remat policies by name: every policy computes the same loss and gradients, and they differ
in what the backward keeps.

``models.layers.REMAT_POLICIES`` maps ``ModelConfig.remat`` (and ``StageConfig.remat``) to a
``jax.checkpoint`` policy of the scanned layer body. The equality test runs the tiny VLM (vision
tower, projector, LLM) under every policy against ``none`` in fp32. The residual test reads what
each policy saves for the backward of a scanned decoder stack from two places: the residuals
``jax.vjp`` keeps (the arrays the backward closes over) and the compiled gradient's temporary
memory. The stack uses a head dim (24) whose attention output [L, B, T, H, head_dim] matches no
other activation shape, so its presence identifies the tagged ``attention_out`` residual.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longvila_jax.config.base import ConfigError, load_config
from longvila_jax.config.model import REMAT_NAMES, ModelConfig, RematPolicy
from longvila_jax.core.loss import token_ce_sum
from longvila_jax.models.layers import REMAT_POLICIES
from longvila_jax.models.llm import LLM
from longvila_jax.models.vlm import LongVILA

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/model/tiny-qwen2.yaml"
# The policies the issue names, plus "everything"; "none" is the reference.
POLICIES = [p for p in REMAT_NAMES if p != "none"]


def test_every_config_name_has_a_policy():
    assert set(REMAT_POLICIES) == set(typing.get_args(RematPolicy)) == set(REMAT_NAMES)
    assert {"none", "nothing_saveable", "save_attention", "dots_saveable"} <= set(REMAT_NAMES)
    assert "dots_with_no_batch_dims_saveable" in REMAT_NAMES
    cfg = load_config(ModelConfig, TINY)
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(cfg, remat="full")
    assert e.value.field == "remat" and "save_attention" in str(e.value)
    with pytest.raises(ConfigError, match="remat"):
        load_config(ModelConfig, TINY, ("remat=save_everything",))


def _vlm_loss_and_grads(policy: str):
    """Loss and gradients of the tiny VLM: 2 frames through the tower and projector, their
    tokens followed by text through the LLM, token-mean CE on the text."""
    cfg = dataclasses.replace(load_config(ModelConfig, TINY), remat=policy)
    model = LongVILA(cfg, rngs=nnx.Rngs(0))  # the same seed: the same parameters per policy
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(1), 3)
    size = cfg.vision.image_size
    frames = jax.random.uniform(keys[0], (2, size, size, 3), jnp.float32, -1.0, 1.0)
    ids = jax.random.randint(keys[1], (1, 24), 11, cfg.llm.vocab_size)
    labels = jax.random.randint(keys[2], (1, 2 * cfg.tokens_per_frame + 24), 0, 500)

    def loss(state):
        m = nnx.merge(graphdef, state)
        visual = m.encode_frames(frames).reshape(1, -1, cfg.llm.hidden_size)
        x = jnp.concatenate([visual, m.llm.embed(ids)], axis=1)
        ce, n = token_ce_sum(m.llm.logits, m.llm.hidden(inputs_embeds=x), labels)
        return ce / n

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    return float(value), {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def reference():
    return _vlm_loss_and_grads("none")


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_gives_the_loss_and_gradients_of_none(reference, policy):
    ref_loss, ref_grads = reference
    loss, grads = _vlm_loss_and_grads(policy)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    # fp32 tolerance: the recomputed forward is the same ops, only fused differently. Errors are
    # relative to the leaf's largest entry, or to 1% of the largest gradient anywhere for leaves
    # that are zero in exact arithmetic and hold only rounding noise (the key biases: softmax
    # ignores a constant added to every score of a row).
    floor = 1e-2 * max(float(np.max(np.abs(r))) for r in ref_grads.values())
    for name, g in grads.items():
        r = ref_grads[name]
        scale = max(float(np.max(np.abs(r))), floor)
        err = float(np.max(np.abs(g - r))) / scale
        assert err <= 1e-5, f"{policy}: d{name} max relative error {err:.2e}"
    assert any(np.any(g != 0) for g in grads.values())


L, B, T = 3, 2, 16


def _stack():
    """Scanned decoder stack whose attention output shape is unique (see the docstring)."""
    cfg = load_config(ModelConfig, TINY)
    llm = dataclasses.replace(cfg.llm, head_dim=24, num_hidden_layers=L)  # H * 24 = 96 != 64
    return dataclasses.replace(cfg, llm=llm)


def _saved(policy: str):
    """(stacked residual shapes, residual bytes, compiled gradient temp bytes) of one policy."""
    cfg = dataclasses.replace(_stack(), remat=policy)
    graphdef, state = nnx.split(LLM(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.llm.hidden_size), jnp.float32)

    def f(state, x):
        return nnx.merge(graphdef, state).hidden(inputs_embeds=x).sum()

    # The vjp function is a pytree whose leaves are the residuals the backward closes over.
    residuals = jax.tree.leaves(jax.jit(lambda s, x: jax.vjp(f, s, x)[1])(state, x))
    # Per-layer residuals come out of the scan stacked on a leading [L] axis.
    stacked = sorted(tuple(r.shape) for r in residuals if r.ndim >= 4 and r.shape[0] == L)
    nbytes = sum(r.size * r.dtype.itemsize for r in residuals)
    temp = jax.jit(jax.grad(f)).lower(state, x).compile().memory_analysis().temp_size_in_bytes
    return stacked, nbytes, temp


def test_policies_differ_in_what_the_backward_saves():
    cfg = _stack().llm
    carry = (L, B, T, cfg.hidden_size)
    attention_out = (L, B, T, cfg.num_attention_heads, cfg.dim_per_head)
    saved = {p: _saved(p) for p in ("none", "nothing_saveable", "save_attention")}
    # Full remat keeps only each layer's input carry; save_attention adds exactly the tagged
    # attention output of every layer (a missing checkpoint_name would make the two equal).
    assert saved["nothing_saveable"][0] == [carry]
    assert saved["save_attention"][0] == sorted([carry, attention_out])
    assert attention_out not in saved["nothing_saveable"][0]
    # No remat keeps many more per-layer tensors (scores, MLP activations...).
    assert len(saved["none"][0]) > 10
    for i in (1, 2):  # residual bytes, then the compiled gradient's temporary memory
        none, nothing, attn = (saved[p][i] for p in ("none", "nothing_saveable", "save_attention"))
        assert nothing < attn < none, (i, nothing, attn, none)
