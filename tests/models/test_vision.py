"""SigLIP vision-tower parity with HF ``SiglipVisionModel`` (``hidden_states[select_layer]``).

Tiny random towers at two resolutions, one with an odd patch grid (70 px / 14 = 5 x 5). Weights
enter through the mapping table, with and without the legacy ``vision_model.`` prefix.
Tolerance: fp32 max abs error <= 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from longvila_jax.ckpt import mapping
from longvila_jax.config.model import ModelConfig, VisionConfig
from longvila_jax.core.axes import LAYERS
from longvila_jax.models.vision import VisionTower

LAYERS_TOTAL = 3


def build(image_size: int, patch_size: int, select_layer: int = -2, prefix: bool = False):
    vc = VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS_TOTAL,
        num_attention_heads=4,
        select_layer=select_layer,
    )
    torch.manual_seed(image_size)
    hf = tf.SiglipVisionModel(
        tf.SiglipVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=LAYERS_TOTAL,
            num_attention_heads=4,
            layer_norm_eps=vc.layer_norm_eps,
            hidden_act=vc.hidden_act,
            attn_implementation="eager",
        )
    ).eval()
    with torch.no_grad():  # HF LayerNorms start at 1/0; make them non-trivial
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = ModelConfig(vision=vc)
    model = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    pre = "vision_model." if prefix else ""
    sd = {pre + k: v.numpy() for k, v in hf.state_dict().items()}
    mapping.load_state_dict(model, "vision_tower", sd)
    return cfg, hf, model


def compare(cfg, hf, model, n: int = 2) -> float:
    s = cfg.vision.image_size
    x = np.random.RandomState(s).standard_normal((n, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
    want = out.hidden_states[cfg.vision.select_layer].numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert got.shape == want.shape == (n, cfg.vision.num_patches, 32)
    return float(np.abs(got - want).max())


@pytest.mark.parametrize(
    "image_size,patch_size,prefix", [(70, 14, False), (70, 14, True), (32, 8, False)]
)
def test_matches_hf_hidden_states(image_size, patch_size, prefix):
    cfg, hf, model = build(image_size, patch_size, prefix=prefix)
    assert cfg.vision.layers_used == LAYERS_TOTAL - 1
    assert compare(cfg, hf, model) <= 1e-5


def test_other_select_layer():
    cfg, hf, model = build(32, 8, select_layer=1)
    assert cfg.vision.layers_used == 1
    assert compare(cfg, hf, model) <= 1e-5


def test_unused_tensors_and_names():
    cfg, hf, model = build(70, 14)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    used = mapping.expected_names(cfg, "vision_tower")
    unused = sorted(set(sd) - set(used))
    assert set(used) <= set(sd)
    assert unused and all(
        n.startswith(("post_layernorm.", "head.", f"encoder.layers.{LAYERS_TOTAL - 1}."))
        for n in unused
    )
    for n in unused:
        assert mapping.resolve(cfg, "vision_tower", n) == "unused"
        assert mapping.resolve(cfg, "vision_tower", "vision_model." + n) == "unused"
    assert (
        mapping.resolve(cfg, "vision_tower", f"encoder.layers.{LAYERS_TOTAL}.mlp.fc1.weight")
        is None
    )
    assert mapping.resolve(cfg, "vision_tower", "embeddings.bogus.weight") is None
    t = mapping.resolve(
        cfg, "vision_tower", "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    )
    assert (t.path, t.layer, t.transform) == (
        ("encoder", "layers", "self_attn", "k_proj", "kernel"),
        1,
        "transpose",
    )
    assert mapping.hf_name(cfg, "vision_tower", t.path, 1, siglip_prefix=True) == (
        "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    )
    exported = mapping.export_state_dict(model, "vision_tower")
    assert sorted(exported) == sorted(used)
    for k, v in exported.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    prefixed = mapping.export_state_dict(model, "vision_tower", siglip_prefix=True)
    assert sorted(prefixed) == sorted("vision_model." + k for k in used)


def test_patch_kernel_is_hwio_and_axes_annotated():
    cfg, hf, model = build(70, 14)
    kernel = np.asarray(model.embeddings.patch_embedding.kernel[...])
    assert kernel.shape == (14, 14, 3, 32)
    w = hf.state_dict()["embeddings.patch_embedding.weight"].numpy()  # [O, I, kh, kw]
    assert kernel[2, 5, 1, 7] == w[7, 1, 2, 5]
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["logical_axes"]
            assert len(axes) == var[...].ndim, (path, axes)
            assert (axes[0] == LAYERS) == ("layers" in path), (path, axes)


def test_bad_pixel_shape_raises():
    cfg, _, model = build(32, 8)
    with pytest.raises(ValueError, match="pixel_values"):
        model(np.zeros((1, 3, 32, 32), np.float32))
