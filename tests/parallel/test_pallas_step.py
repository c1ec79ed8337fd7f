"""One trainer step of the tiny MM-SP model with the mesh file's ``block_kernel: pallas`` (the
fused block kernels, interpreted on CPU) equals the same step with ``block_kernel: xla``.

The model is ``configs/model/tiny-qwen2.yaml`` (fp32, GQA 4 / 2 heads), the mesh
``configs/mesh/cpu8_r2u4.yaml`` with a ``block_kernel`` override, the objective
``parallel.mmsp.MMSPPlan`` (frames sharded over the 8 devices, two-hop routing, 2D attention)
and the step the trainer's own (``train.step.make_train_step`` / ``jit_step``: accumulation of
two micro-batches, token-mean loss, guarded update). The rows pack video, text-only and padding
with sample boundaries inside the attention tiles.

Tolerances: the loss depends smoothly on the attention outputs, whose fp32 difference between
the kernels is <= 1e-5 abs (test_pallas_blocks), so it may move by 1e-5 relative at most (it
comes out bit-identical). The update uses plain SGD: Adam's first step is lr * g / (|g| + eps)
per entry, whose sign flips for entries with |g| below the kernels' gradient tolerance, which
would compare rounding noise; with SGD the update is lr * g, so every parameter's update
(new - old) must agree to the gradient tolerance, 1e-4 relative to its largest entry, plus
the rounding of the new value to fp32 (2 ulps; lr = 1 keeps updates well above it).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.parallel.mesh import load_mesh_config, make_mesh
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.train.state import ModelTemplate, create_state, state_shardings
from longvila_jax.train.step import jit_step, make_train_step

REPO = Path(__file__).resolve().parents[2]
IMG, NL = 3, 10  # <image> id of the tiny tokenizer; the "\n" after every frame
L, F_SLOTS, ACCUM = 128, 8, 2
LR = 1.0  # large, so that updates stand well above the parameters' fp32 rounding
LOSS_TOL, UPDATE_TOL = 1e-5, 1e-4
# (frames, prompt tokens, answer tokens) of the samples packed in each row.
ROWS = [[(2, 10, 12), (0, 20, 15)], [(3, 8, 20)], [(1, 30, 9), (0, 6, 7)], [(0, 40, 30)]]


def _batch(tpf: int, image_size: int) -> dict[str, np.ndarray]:
    """A data-pipeline batch (``data.pipeline`` keys) of the rows in ``ROWS``."""
    rng = np.random.default_rng(0)
    b, t_max = len(ROWS), 100
    out = {
        "input_ids": np.zeros((b, t_max), np.int32),
        "text_to_expanded": np.full((b, t_max), L, np.int32),
        "text_segment_ids": np.zeros((b, t_max), np.int32),
        "segment_ids": np.zeros((b, L), np.int32),
        "positions": np.zeros((b, L), np.int32),
        "labels": np.full((b, L), IGNORE_INDEX, np.int32),
        "frames": np.zeros((b, F_SLOTS, image_size, image_size, 3), np.float32),
        "frame_mask": np.zeros((b, F_SLOTS), bool),
        "frame_segment_ids": np.zeros((b, F_SLOTS), np.int32),
    }
    for r, samples in enumerate(ROWS):
        t = e = f = 0
        for s_id, (n_frames, n_prompt, n_answer) in enumerate(samples, start=1):
            tokens = list(rng.integers(11, 500, n_prompt)) + [IMG, NL] * n_frames
            start, answer_from = e, None
            for i, tok in enumerate(tokens + list(rng.integers(11, 500, n_answer))):
                if i == len(tokens):
                    answer_from = e
                width = tpf if tok == IMG else 1
                out["input_ids"][r, t], out["text_to_expanded"][r, t] = tok, e
                out["text_segment_ids"][r, t] = s_id
                if tok == IMG:
                    out["frames"][r, f] = rng.uniform(-1, 1, out["frames"].shape[2:])
                    out["frame_mask"][r, f], out["frame_segment_ids"][r, f] = True, s_id
                    f += 1
                out["segment_ids"][r, e : e + width] = s_id
                t, e = t + 1, e + width
            out["positions"][r, start:e] = np.arange(e - start)
            # Labels shifted on the natural order: position p holds the answer token at p + 1.
            out["labels"][r, answer_from - 1 : e - 1] = out["input_ids"][r, t - n_answer : t]
        assert e <= L and t <= t_max
    return out


def _step(block_kernel: str, cfg: ModelConfig, flat: dict, batch: dict):
    """(metrics, trainable params before, after) of one trainer step on the r2u4 mesh."""
    mesh_cfg = load_mesh_config(
        REPO / "configs/mesh/cpu8_r2u4.yaml", [f"block_kernel={block_kernel}"]
    )
    assert mesh_cfg.block_kernel == block_kernel
    mesh = make_mesh(mesh_cfg)
    plan = MMSPPlan(
        mesh,
        seq_len=L,
        frame_slots=F_SLOTS,
        tokens_per_frame=cfg.tokens_per_frame,
        image_token_id=IMG,
        batch_axes=mesh_cfg.activation_rules["batch"],
        grad_accum=ACCUM,
        kv_chunk=16,
        block_kernel=mesh_cfg.block_kernel,
    )
    template = ModelTemplate.build(cfg)
    optimizer = optax.sgd(LR)
    trainable = set(flat)
    param_sh = template.shardings(mesh, mesh_cfg.param_rules)
    abstract = jax.eval_shape(lambda p: create_state(p, trainable, optimizer), flat)
    state_sh = state_shardings(abstract, param_sh, mesh, optimizer)
    state = jax.jit(lambda p: create_state(p, trainable, optimizer), out_shardings=state_sh)(
        jax.device_put(flat, param_sh)
    )
    before = jax.tree.map(np.asarray, state["params"]["trainable"])
    step = make_train_step(template, plan, optimizer, lambda _: LR)
    state, metrics = jit_step(step, state_sh, plan.shardings(), mesh)(state, plan.to_device(batch))
    after = jax.tree.map(np.asarray, state["params"]["trainable"])
    return jax.tree.map(np.asarray, metrics), before, after


@pytest.fixture(scope="module")
def model():
    """The tiny config and cheap host-side random parameters (norm scales 1, the rest small
    normals): the comparison does not depend on the init, and no model is built for it."""
    cfg = load_config(ModelConfig, REPO / "configs/model/tiny-qwen2.yaml")
    assert cfg.compute_dtype == "float32"
    rng = np.random.default_rng(0)
    flat = {}
    for name, shape in ModelTemplate.build(cfg).shapes.items():
        flat[name] = (
            np.ones(shape.shape, shape.dtype)
            if name.endswith("scale")
            else (0.05 * rng.standard_normal(shape.shape)).astype(shape.dtype)
        )
    return cfg, flat


def test_train_step_with_pallas_blocks_matches_xla(model):
    cfg, flat = model
    batch = _batch(cfg.tokens_per_frame, cfg.vision.image_size)
    got = {kernel: _step(kernel, cfg, flat, batch) for kernel in ("pallas", "xla")}
    (m_p, before, after_p), (m_x, _, after_x) = got["pallas"], got["xla"]
    assert bool(m_p["applied"]) and bool(m_x["applied"]) and m_p["tokens"] == m_x["tokens"] > 0
    loss_rel = abs(float(m_p["loss"]) - float(m_x["loss"])) / abs(float(m_x["loss"]))
    norm_rel = abs(float(m_p["grad_norm"]) - float(m_x["grad_norm"])) / float(m_x["grad_norm"])
    assert loss_rel <= LOSS_TOL and norm_rel <= UPDATE_TOL, (loss_rel, norm_rel)
    # Softmax is invariant to a constant added to every key, so the vision tower's key bias (no
    # RoPE there) has an exact gradient of 0: both updates must be rounding noise.
    zero_grad = "vision/encoder/layers/self_attn/k_proj/bias"
    noise = UPDATE_TOL * np.max(np.abs(_update(after_x, before, zero_grad[:-4] + "kernel")))
    for after in (after_p, after_x):
        assert np.max(np.abs(_update(after, before, zero_grad))) <= noise, zero_grad
    worst = {}
    for key in _keys(before):
        if key == zero_grad:
            continue
        update_x, update_p = _update(after_x, before, key), _update(after_p, before, key)
        scale = np.max(np.abs(update_x))
        assert scale > 0, f"{key}: no update, the comparison could not fail"
        # The new parameters are fp32 roundings of old - lr * g: updates that agree to the
        # gradient tolerance land within it plus one rounding (2 ulps of the value) of each
        # other; the ulp of a parameter near 1 is 1.2e-7, the size of a small update's 1e-4.
        new_x = _leaf(after_x, key)
        allowed = UPDATE_TOL * scale + 2 * np.spacing(np.abs(new_x))
        excess = np.abs(_leaf(after_p, key) - new_x) - allowed
        worst[key] = float(np.max(np.abs(update_p - update_x)) / scale)
        assert np.all(excess <= 0), (key, worst[key], float(np.max(excess)))
    print("loss rel", loss_rel, "grad norm rel", norm_rel, "worst update rel",
          sorted(worst.items(), key=lambda kv: -kv[1])[:3])  # fmt: skip


def _keys(tree, prefix: str = "") -> list[str]:
    """'a/b/c' paths of a nested dict's leaves."""
    out = []
    for k, v in tree.items():
        out += _keys(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _leaf(tree, key: str) -> np.ndarray:
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _update(after, before, key: str) -> np.ndarray:
    return _leaf(after, key) - _leaf(before, key)
