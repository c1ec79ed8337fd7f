"""V-NIAH's faithful mode: upstream's "pad" letterbox (against PIL, as ``expand2square``), the
RoPE override (against numpy RoPE with and without the linear factor) and the fixed prompt."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from longvila_jax.config.model import RopeScaling
from longvila_jax.eval.letterbox import PAD_FILL, pad_and_resize
from longvila_jax.eval.rope_override import rope_overrides, with_config_overrides
from longvila_jax.infer.prompts import VNIAH_PROMPTS, vniah_upstream_ids
from longvila_jax.models.llm import rope_tables


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_letterbox_matches_expand2square(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = shape
    # Upstream: Image.new(mode, (side, side), tuple(int(x * 255) for x in image_mean)), paste at
    # the centre offset, then the processor's bicubic resize.
    fill = tuple(int(x * 255) for x in (0.5, 0.5, 0.5))
    assert fill == PAD_FILL == (127, 127, 127)
    pil = Image.fromarray(image)
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), fill)
        square.paste(pil, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        pil = square
    want = np.asarray(pil.resize((24, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pad_and_resize(image, 24), want)


def _numpy_rope(positions, head_dim, theta, factor):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = (positions[:, None] / factor) * inv
    emb = np.concatenate([angles, angles], -1)
    return np.cos(emb), np.sin(emb)


def test_rope_override_drops_the_linear_factor(tiny_model):
    cfg = tiny_model.cfg
    scaled_cfg = dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, rope_scaling=RopeScaling(factor=4.0))
    )
    scaled = with_config_overrides(tiny_model, [])  # no overrides: the same model
    assert scaled is tiny_model
    scaled = with_config_overrides(tiny_model, ["llm.rope_scaling={type: linear, factor: 4.0}"])
    assert scaled.cfg == scaled_cfg
    plain = with_config_overrides(scaled, rope_overrides(True, 5000.0))
    assert plain.cfg.llm.rope_scaling is None and plain.cfg.llm.rope_theta == 5000.0
    positions = np.arange(0, 4000, 97)
    for model, theta, factor in ((scaled, cfg.llm.rope_theta, 4.0), (plain, 5000.0, 1.0)):
        llm = model.cfg.llm
        cos, sin = rope_tables(
            jnp.asarray(positions[None]), llm.dim_per_head, llm.rope_theta, llm.rope_position_scale
        )
        want_cos, want_sin = _numpy_rope(positions, llm.dim_per_head, theta, factor)
        np.testing.assert_allclose(np.asarray(cos[0]), want_cos, atol=2e-3)
        np.testing.assert_allclose(np.asarray(sin[0]), want_sin, atol=2e-3)
    # Same parameters, different positions: the LLM's outputs change with the factor.
    ids = jnp.asarray(np.arange(1, 40)[None] % 50)
    a = np.asarray(scaled.llm(ids))
    b = np.asarray(with_config_overrides(scaled, rope_overrides(True, None)).llm(ids))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        np.asarray(scaled.llm.embed_tokens.embedding[...]),
        np.asarray(plain.llm.embed_tokens.embedding[...]),
    )


def test_upstream_prompt_has_the_full_stop(tokenizer):
    ids = vniah_upstream_ids(tokenizer, "Q?", 3, template="qwen2", image_token_id=3)
    text = tokenizer.decode(ids.tolist())
    pre, post = VNIAH_PROMPTS["qwen2"]
    assert "You are a helpful assistant.<|im_end|>" in pre
    assert text == pre + "<image>" * 3 + "Q?" + post
