"""Whole-VLM parity: LongVILA logits vs a PyTorch reference built from HF modules.

Reference: HF ``SiglipVisionModel`` ``hidden_states[-2]`` -> the torch projector oracle ->
visual tokens spliced by hand into HF ``Qwen2ForCausalLM`` ``inputs_embeds`` (each placeholder
replaced by its frame's tokens, frames in row-major (batch, position) order). Two rows with
different frame counts, an odd 5 x 5 patch grid, column-major block order, and an image token
id beyond the vocabulary. Tolerance: fp32 max abs error <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from helpers.torch_projector import TorchProjector

from longvila_jax.ckpt import mapping
from longvila_jax.config.model import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from longvila_jax.models.llm import LLM
from longvila_jax.models.vlm import LongVILA, expand_prompts

V, D, DV, IMG = 96, 32, 16, 200  # IMG >= V: must never reach the embedding table
NL = 7  # the "\n" text token after each frame


def make_cfg() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            image_size=70,
            patch_size=14,
            hidden_size=DV,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
        ),
        projector=ProjectorConfig(type="mlp_downsample", token_order="col_major"),
        llm=LLMConfig(
            arch="qwen2",
            vocab_size=V,
            hidden_size=D,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10_000.0,
        ),
        image_token_id=IMG,
    )


@pytest.fixture(scope="module")
def setup():
    cfg = make_cfg()
    vc, lc = cfg.vision, cfg.llm
    torch.manual_seed(0)
    siglip = tf.SiglipVisionModel(
        tf.SiglipVisionConfig(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            hidden_size=DV,
            intermediate_size=vc.intermediate_size,
            num_hidden_layers=vc.num_hidden_layers,
            num_attention_heads=vc.num_attention_heads,
            attn_implementation="eager",
        )
    ).eval()
    proj = TorchProjector("mlp_downsample", DV, D, "col_major")
    proj = proj.randomize_(torch.Generator().manual_seed(1)).eval()
    llm = tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=lc.intermediate_size,
            num_hidden_layers=lc.num_hidden_layers,
            num_attention_heads=lc.num_attention_heads,
            num_key_value_heads=lc.num_key_value_heads,
            rms_norm_eps=lc.rms_norm_eps,
            rope_theta=lc.rope_theta,
            attn_implementation="eager",
        )
    ).eval()
    model = nnx.eval_shape(lambda: LongVILA(cfg, rngs=nnx.Rngs(0)))
    for comp, ref in (("vision_tower", siglip), ("mm_projector", proj), ("llm", llm)):
        mapping.load_state_dict(model, comp, {k: v.numpy() for k, v in ref.state_dict().items()})
    return cfg, siglip, proj, llm, model


def reference_logits(siglip, proj, llm, ids: np.ndarray, pixels: np.ndarray) -> list[np.ndarray]:
    """Per-row logits [T_exp_row, V] from the HF modules."""
    with torch.no_grad():
        hs = siglip(
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True
        )
        visual = proj(hs.hidden_states[-2])  # [N, tokens_per_frame, D]
        frame, rows = 0, []
        for row in ids:
            parts = []
            for tok in row:
                if tok == IMG:
                    parts.append(visual[frame])
                    frame += 1
                else:
                    parts.append(llm.model.embed_tokens(torch.tensor([int(tok)])))
            embeds = torch.cat(parts)[None]
            rows.append(llm(inputs_embeds=embeds).logits[0].numpy())
    return rows


def test_logits_match_reference(setup):
    cfg, siglip, proj, llm, model = setup
    ids = np.array(
        [
            [IMG, NL, IMG, NL, 11, 12, 13],  # two frames
            [3, IMG, NL, 21, 22, 23, 24],  # one frame, different expanded length
        ]
    )
    pixels = np.random.RandomState(0).standard_normal((3, 70, 70, 3)).astype(np.float32)
    refs = reference_logits(siglip, proj, llm, ids, pixels)
    out = np.asarray(model(ids, pixels))
    tpf = cfg.tokens_per_frame
    assert tpf == 9
    assert out.shape == (2, 2 * tpf + 5, V)
    for r, ref in enumerate(refs):
        assert ref.shape[0] == [2 * tpf + 5, tpf + 6][r]
        err = np.abs(out[r, : ref.shape[0]] - ref).max()
        assert err <= 1e-4, (r, err)


def test_explicit_positions_and_segments(setup):
    cfg, *_, model = setup
    ids = np.array([[5, IMG, NL, 9, 10]])
    pixels = np.random.RandomState(1).standard_normal((1, 70, 70, 3)).astype(np.float32)
    ex = expand_prompts(ids, num_frames=1, image_token_id=IMG, tokens_per_frame=9, vocab_size=V)
    default = np.asarray(model(ids, pixels))
    explicit = np.asarray(model(ids, pixels, positions=ex.positions, segment_ids=ex.segment_ids))
    np.testing.assert_array_equal(explicit, default)
    # Shifting every position leaves relative RoPE angles, hence the logits, unchanged...
    shifted = np.asarray(model(ids, pixels, positions=ex.positions + 5))
    np.testing.assert_allclose(shifted, default, rtol=0, atol=1e-4)
    # ...while splitting the row into two segments changes the second one only.
    seg = np.where(np.arange(ex.positions.shape[1]) < 3, 1, 2)[None].astype(np.int32)
    split = np.asarray(model(ids, pixels, segment_ids=seg))
    np.testing.assert_allclose(split[:, :3], default[:, :3], rtol=0, atol=1e-6)
    assert np.abs(split[:, 3:] - default[:, 3:]).max() > 1e-3
    with pytest.raises(ValueError, match="positions"):
        model(ids, pixels, positions=ex.positions[:, :-1])


def test_text_only_equals_llm(setup):
    _, *_, model = setup
    ids = np.array([[1, 2, 3, 4]])
    want = nnx.jit(lambda m, x: m.llm(x))(model, ids)
    np.testing.assert_allclose(np.asarray(model(ids, None)), np.asarray(want), rtol=0, atol=1e-6)


def test_media_ids_never_reach_the_table(setup, monkeypatch):
    _, *_, model = setup
    seen = []
    original = LLM.embed

    def spy(self, ids):
        seen.append(np.asarray(ids))
        return original(self, ids)

    monkeypatch.setattr(LLM, "embed", spy)
    text_ids = np.array([[IMG, IMG, 5]], np.int32)  # placeholder ids left at visual positions
    visual_index = np.array([[0, 1, -1]], np.int32)
    tokens = np.ones((2, D), np.float32)
    out = np.asarray(model.embed(text_ids, visual_index, tokens))
    assert seen and all(s.max() < V for s in seen)
    np.testing.assert_array_equal(out[0, :2], tokens)


def test_per_row_visual_tokens_splice_like_the_flat_ones(setup):
    """``embed`` with [B, M, D] tokens and row-local indices (packed training rows) splices
    exactly like [B * M, D] tokens with batch-wide indices (prompts)."""
    _, *_, model = setup
    tokens = np.random.default_rng(0).standard_normal((2, 3, D)).astype(np.float32)
    text_ids = np.array([[IMG, 5, IMG, 6], [7, IMG, IMG, IMG]], np.int32)
    row_index = np.array([[0, -1, 2, -1], [-1, 1, 0, 2]], np.int32)
    flat_index = np.where(row_index >= 0, row_index + 3 * np.arange(2)[:, None], -1)
    per_row = np.asarray(model.embed(text_ids, row_index, tokens))
    flat = np.asarray(model.embed(text_ids, flat_index.astype(np.int32), tokens.reshape(6, D)))
    np.testing.assert_array_equal(per_row, flat)
    np.testing.assert_array_equal(per_row[1, 2], tokens[1, 0])  # its own row's token 0
    text = np.asarray(model.llm.embed(np.array([[5, 7]], np.int32)))[0]
    np.testing.assert_array_equal(per_row[[0, 1], [1, 0]], text)


def test_expand_prompts_layout():
    ids = np.array([[4, IMG, NL, 5], [IMG, NL, IMG, 6]])
    ex = expand_prompts(ids, num_frames=3, image_token_id=IMG, tokens_per_frame=2, vocab_size=V)
    np.testing.assert_array_equal(ex.visual_index, [[-1, 0, 1, -1, -1, -1], [2, 3, -1, 4, 5, -1]])
    np.testing.assert_array_equal(ex.text_ids, [[4, 0, 0, NL, 5, 0], [0, 0, NL, 0, 0, 6]])
    np.testing.assert_array_equal(ex.segment_ids, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(ex.positions, [list(range(6))] * 2)
    assert expand_prompts(
        ids, num_frames=3, image_token_id=IMG, tokens_per_frame=2, vocab_size=V, pad_to=8
    ).text_ids.shape == (2, 8)


def test_expand_prompts_errors():
    ids = np.array([[IMG, NL, IMG]])
    with pytest.raises(ValueError, match="2 image placeholders.*3 frames"):
        expand_prompts(ids, num_frames=3, image_token_id=IMG, tokens_per_frame=2, vocab_size=V)
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 150"):
        expand_prompts(
            np.array([[IMG, 150]]),
            num_frames=1,
            image_token_id=IMG,
            tokens_per_frame=2,
            vocab_size=V,
        )


def test_frame_count_mismatch_in_model(setup):
    _, *_, model = setup
    pixels = np.zeros((2, 70, 70, 3), np.float32)
    with pytest.raises(ValueError, match="1 image placeholders.*2 frames"):
        model(np.array([[IMG, NL]]), pixels)
