"""Parameter counts of every full-size config, from abstract models (no memory allocated).

Each non-tiny ``configs/model/*.yaml`` is built with ``nnx.eval_shape`` and compared per
component against HF/torch models instantiated on the meta device, tensor by tensor through the
mapping table, and against published totals:

* Llama-3-LongVILA-8B projector: 35,668,992 (the 35.67 M of the release).
* Llama-3-8B at 128,257 rows: 8,030,261,248 published at 128,256 rows + 2 x 4096.
* Qwen2-7B: 7,615,616,512 published at 152,064 rows -> 151,648 rows: minus 2 x 416 x 3584.
* Qwen2-1.5B (tied): 1,543,714,304 published at 151,936 rows -> 151,648 rows: minus 288 x 1536.

The vision tower holds only the layers ``hidden_states[-2]`` needs, so ours + the tensors the
mapping calls "unused" (last layer, post-LN, head) must add up to the HF tower.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers as tf
from flax import nnx
from helpers.torch_projector import TorchProjector

from longvila_jax.ckpt import mapping
from longvila_jax.config import ModelConfig, load_config
from longvila_jax.core import trees
from longvila_jax.models.vlm import LongVILA

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
FULL_SIZE = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("tiny"))
EXPECTED_FILES = {
    "llama3-longvila-8b.yaml",
    "qwen2-7b-longvila-256f.yaml",
    "qwen2-7b-longvila-1m.yaml",
    "qwen2-1.5b-longvila-256f.yaml",
    "longvila-r1-7b.yaml",
}

QWEN2_7B_LLM = 7_615_616_512 - 2 * (152_064 - 151_648) * 3584
PUBLISHED = {
    "llama3-longvila-8b.yaml": {"llm": 8_030_261_248 + 2 * 4096, "mm_projector": 35_668_992},
    "qwen2-7b-longvila-256f.yaml": {"llm": QWEN2_7B_LLM},
    "qwen2-7b-longvila-1m.yaml": {"llm": QWEN2_7B_LLM},
    "longvila-r1-7b.yaml": {"llm": QWEN2_7B_LLM},
    "qwen2-1.5b-longvila-256f.yaml": {"llm": 1_543_714_304 - (151_936 - 151_648) * 1536},
}


def count(tree) -> int:
    return sum(math.prod(x.shape) for _, x in trees.leaves(tree))


def hf_reference(cfg: ModelConfig, component: str) -> torch.nn.Module:
    """The HF/torch module of a component, on the meta device (shapes only)."""
    vc, lc = cfg.vision, cfg.llm
    with torch.device("meta"):
        if component == "vision_tower":
            return tf.SiglipVisionModel(
                tf.SiglipVisionConfig(
                    image_size=vc.image_size,
                    patch_size=vc.patch_size,
                    hidden_size=vc.hidden_size,
                    intermediate_size=vc.intermediate_size,
                    num_hidden_layers=vc.num_hidden_layers,
                    num_attention_heads=vc.num_attention_heads,
                )
            )
        if component == "mm_projector":
            return TorchProjector(cfg.projector.type, vc.hidden_size, lc.hidden_size, "row_major")
        kw = dict(
            vocab_size=lc.vocab_size,
            hidden_size=lc.hidden_size,
            intermediate_size=lc.intermediate_size,
            num_hidden_layers=lc.num_hidden_layers,
            num_attention_heads=lc.num_attention_heads,
            num_key_value_heads=lc.num_key_value_heads,
            tie_word_embeddings=lc.tie_word_embeddings,
        )
        if lc.arch == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(attention_bias=lc.o_bias, **kw))
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))


def test_all_full_size_configs_present():
    assert set(FULL_SIZE) >= EXPECTED_FILES, sorted(EXPECTED_FILES - set(FULL_SIZE))


@pytest.mark.parametrize("name", FULL_SIZE)
def test_param_counts(name):
    cfg = load_config(ModelConfig, CONFIG_DIR / name)
    model = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))
    ours = {
        comp: nnx.to_pure_dict(nnx.state(getattr(model, attr)))
        for comp, attr in (
            ("vision_tower", "vision"),
            ("mm_projector", "projector"),
            ("llm", "llm"),
        )
    }
    for comp, tree in ours.items():
        ref = hf_reference(cfg, comp)
        # named_parameters() lists a tied weight once, like the published counts.
        hf_params = dict(ref.named_parameters())
        hf_total = sum(p.numel() for p in hf_params.values())
        hf_state = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        unused = 0
        for hf_name, shape in hf_state.items():
            target = mapping.resolve(cfg, comp, hf_name)
            assert target is not None, f"{name}: HF tensor {hf_name} has no mapping"
            if target == "unused":
                unused += math.prod(shape) if hf_name in hf_params else 0
        for hf_name in mapping.expected_names(cfg, comp):
            assert hf_name in hf_state, f"{name}: {hf_name} not in the HF {comp}"
            target = mapping.resolve(cfg, comp, hf_name)
            node = tree
            for key in target.path:
                node = node[key]
            shape = node.shape[1:] if target.layer is not None else node.shape
            hf_shape = mapping.hf_shape(target.transform, tuple(shape))
            assert hf_shape == hf_state[hf_name], (name, hf_name, hf_shape)
        assert count(tree) + unused == hf_total, (name, comp, count(tree), unused, hf_total)
        if comp == "vision_tower":
            assert unused > 0  # the last layer, post-LN and head are not in our tower
        else:
            assert unused == 0, (name, comp, unused)
        if comp in PUBLISHED.get(name, {}):
            assert count(tree) == PUBLISHED[name][comp], (name, comp, count(tree))


def test_projector_qwen2_7b_width():
    """Qwen2-7B projector: 29.38 M (longvila.md: ~29.4 M), from the formula, not the model."""
    cfg = load_config(ModelConfig, CONFIG_DIR / "qwen2-7b-longvila-1m.yaml")
    model = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))
    d, din = 3584, 4 * 1152
    want = 2 * din + (din * d + d) + (d * d + d)
    assert want == 29_376_512
    assert count(nnx.to_pure_dict(nnx.state(model.projector))) == want
