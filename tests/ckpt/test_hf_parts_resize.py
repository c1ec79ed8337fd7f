"""Stage 1's ``[BOS]``/``[PAD]`` tokens and vocabulary resize in ``import_hf_parts``.

VILA's ``train.py`` (b760c34, l.743-758) adds ``[BOS]`` when the tokenizer has no BOS, sets
the pad to the unknown token and adds ``[PAD]`` when that is None, each time resizing the LLM's
tables to ``len(tokenizer)`` with the new rows set to the mean of the rows before them
(``smart_tokenizer_and_embedding_resize``). The expected rows here are computed with numpy from
the source safetensors, not by the code under test.

Sources are tiny HF models built offline: a Qwen2-like LLM (fp32, untied, table padded past its
tokenizer; HF's ``Qwen2Tokenizer`` without BOS and unk over the 256 byte symbols, with the
``special_tokens_map.json`` and ``added_tokens.json`` transformers 4 wrote; sharded with an
index) and a Llama-like one (bf16, tied, BOS prepended by the tokenizer, no pad and no unk).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as tf
from helpers import vila_fixture as vf
from helpers.hf_reference import frames, load_hf, vlm_logits
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.hf_parts_import import import_hf_parts
from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.ckpt.safetensors_io import WeightSet
from longvila_jax.ckpt.vila_export import export_vila
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.config.base import ConfigError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROJ = "mlp_downsample_2x2_fix"
# Qwen2-like: a byte-level tokenizer of 259 tokens on a table padded to 264 rows (Qwen2-7B:
# 151646 tokens, 152064 rows).
QWEN = vf.Spec(arch="qwen2", layers=1, v_layers=2, vocab=264, siglip_prefix=False, seed=5)
LLAMA = vf.Spec(
    arch="llama", dtype=torch.bfloat16, layers=1, v_layers=2, vocab=96, tied=True, seed=6
)


def _qwen2_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer class and special tokens (no BOS, no unk, pad = <|endoftext|>) over
    the 256 byte symbols: 259 tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert len(tok) == 259 and tok.bos_token is None and tok.unk_token is None
    return tok


def _tokenizer(n: int, *, bos: bool, unk: bool, pad: str | None) -> tf.PreTrainedTokenizerFast:
    """``n`` tokens: words, then ``SPECIALS`` (and ``<s>`` first when ``bos``, prepended)."""
    specials = (["<s>"] if bos else []) + vf.SPECIALS
    words = {f"w{i}": i for i in range(n - len(specials))}
    tok = Tokenizer(models.WordLevel(words, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(eos_token="<|im_end|>", pad_token=pad, unk_token="w1" if unk else None)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.add_tokens(specials, special_tokens=True)
    if bos:
        fast.bos_token = "<s>"
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", fast.convert_tokens_to_ids("<s>"))]
        )
    assert len(fast) == n
    return fast


def _source(root: Path, spec: vf.Spec, tok, v4_files: bool = False) -> tuple[Path, Path]:
    llm, vision, _ = vf.build_models(spec)
    llm.save_pretrained(root / "llm", max_shard_size=spec.max_shard_size)
    tok.save_pretrained(root / "llm")
    if v4_files:  # what transformers 4 wrote next to a Qwen2 tokenizer
        specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        (root / "llm" / "special_tokens_map.json").write_text(json.dumps(specials))
        added = {t: tok.convert_tokens_to_ids(t) for t in vf.SPECIALS}
        assert added == {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
        (root / "llm" / "added_tokens.json").write_text(json.dumps(added))
    vision.save_pretrained(root / "siglip")
    return root / "llm", root / "siglip"


def _tables(folder: Path) -> dict[str, np.ndarray]:
    ws = WeightSet(folder)
    return {n: ws.read(n) for n in ws.names}


def _mean_rows(table: np.ndarray, n_new: int) -> np.ndarray:
    """Upstream's sequence: each new row is the mean of every row before it."""
    rows = list(table)
    for _ in range(n_new):
        rows.append(np.mean(np.stack(rows).astype(np.float64), axis=0).astype(table.dtype))
    return np.stack(rows[len(table) :])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(source llm dir, project checkpoint, exported VILA dir, ModelConfig)."""
    root = tmp_path_factory.mktemp("qwen")
    llm, siglip = _source(root, QWEN, _qwen2_tokenizer(), v4_files=True)
    cfg = import_hf_parts(llm, siglip, root / "ckpt", projector_type=PROJ)
    export_vila(root / "ckpt", root / "vila")
    return llm, root / "ckpt", root / "vila", cfg


def test_qwen2_like_tokenizer_gets_bos_pad_then_media(qwen):
    _, ckpt, vila, cfg = qwen
    for tok in (load_tokenizer(ckpt), tf.AutoTokenizer.from_pretrained(vila / "llm")):
        assert type(tok).__name__ == "Qwen2Tokenizer"
        assert (tok.bos_token, tok.bos_token_id, tok.pad_token, tok.pad_token_id) == (
            "[BOS]",
            259,
            "[PAD]",
            260,
        )
        assert tok.convert_tokens_to_ids(["<image>", "<vila/video>"]) == [261, 262]
        assert tok.unk_token is None and len(tok) == 263
        # Qwen2 prepends no BOS: plain text encodes as before ("Ġ" is byte 32 -> id 220).
        assert tok("ab c")["input_ids"] == [64, 65, 220, 66]
    added = json.loads((vila / "llm" / "added_tokens.json").read_text())
    assert added == {
        "<|endoftext|>": 256,
        "<|im_start|>": 257,
        "<|im_end|>": 258,
        "[BOS]": 259,
        "[PAD]": 260,
        "<image>": 261,
        "<vila/video>": 262,
    }
    # The table ends before the media ids (as the Qwen2 releases: 151648 rows).
    assert cfg.llm.vocab_size == 261 and cfg.image_token_id == 261
    assert orbax_io.read_model_config(ckpt).llm.vocab_size == 261
    assert json.loads((vila / "llm" / "config.json").read_text())["vocab_size"] == 261
    assert json.loads((vila / "config.json").read_text())["llm_cfg"]["vocab_size"] == 261
    notes = orbax_io.read_provenance(ckpt)["source"]["notes"]
    assert any("[BOS] 259, [PAD] 260" in n and "from 264 to 261 rows" in n for n in notes)


def test_qwen2_like_tables_truncated_and_mean_rows(qwen):
    llm, _, vila, _ = qwen
    src, out = _tables(llm), _tables(vila / "llm")
    assert sorted(src) == sorted(out)
    for name in (EMBED, HEAD):
        assert out[name].shape == (261, QWEN.hidden) and out[name].dtype == np.float32
        # Rows of the tokenizer's 259 tokens bit for bit; padded rows 259..263 dropped.
        assert out[name][:259].tobytes() == src[name][:259].tobytes()
        want = _mean_rows(src[name][:259], 2)
        np.testing.assert_allclose(out[name][259:], want, rtol=1e-6, atol=0)
        assert not np.allclose(out[name][259], src[name][259])  # not a copied padded row
    for name in set(src) - {EMBED, HEAD}:
        assert out[name].tobytes() == src[name].tobytes(), name
    # The recorded index describes the resized tensors.
    index = json.loads((vila / "llm" / "model.safetensors.index.json").read_text())
    sizes = sum(a.nbytes for a in out.values())
    assert index["metadata"]["total_size"] == sizes
    assert index["metadata"]["total_parameters"] == sum(a.size for a in out.values())
    assert set(index["weight_map"]) == set(out)


def test_qwen2_like_round_trip_and_media_never_gathered(qwen, tmp_path):
    _, ckpt, vila, cfg = qwen
    import_vila(vila, tmp_path / "again")
    a, b = orbax_io.load_params(ckpt), orbax_io.load_params(tmp_path / "again")
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    # [BOS] and [PAD] rows are looked up; <image> (id 261 = the row count) never is.
    ids = np.array([259, 5, 6, 261, 3, 261, 3, 7, 260], np.int32)
    px = frames(2, QWEN.v_image)
    want = vlm_logits(load_hf(vila), ids, px, cfg.image_token_id)
    got = np.asarray(load_pretrained(ckpt)(ids[None], px))[0]
    assert got.shape == want.shape == (want.shape[0], 261)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_llama_like_tied_gets_only_pad(tmp_path):
    tok = _tokenizer(96, bos=True, unk=False, pad=None)
    llm, siglip = _source(tmp_path, LLAMA, tok)
    cfg = import_hf_parts(llm, siglip, tmp_path / "ckpt", projector_type=PROJ)
    export_vila(tmp_path / "ckpt", tmp_path / "vila")
    out_tok = load_tokenizer(tmp_path / "ckpt")
    assert (out_tok.bos_token, out_tok.pad_token, out_tok.pad_token_id) == ("<s>", "[PAD]", 96)
    assert out_tok.convert_tokens_to_ids(["<image>", "<vila/video>"]) == [97, 98]
    assert out_tok("w2")["input_ids"] == [tok.bos_token_id, 2]  # one BOS, as before
    assert cfg.llm.vocab_size == 97 and cfg.image_token_id == 97  # Llama-3: 128257 rows
    src, out = _tables(llm), _tables(tmp_path / "vila" / "llm")
    assert HEAD not in out  # tied: one table
    assert out[EMBED].shape == (97, LLAMA.hidden) and out[EMBED].dtype == ml_dtypes.bfloat16
    assert out[EMBED][:96].tobytes() == src[EMBED].tobytes()
    want = _mean_rows(src[EMBED], 1).astype(np.float32)
    # bf16: the port rounds the float64 mean once; allow one bf16 step of disagreement.
    np.testing.assert_allclose(out[EMBED][96:].astype(np.float32), want, rtol=2**-7, atol=0)


def test_complete_tokenizer_is_left_alone(tmp_path):
    """BOS, unk, pad = unk and media tokens present: no resize, files copied verbatim."""
    tok = _tokenizer(94, bos=True, unk=True, pad="w1")
    tok.add_tokens(vf.MEDIA, special_tokens=True)
    llm, siglip = _source(tmp_path, LLAMA, tok)
    cfg = import_hf_parts(llm, siglip, tmp_path / "ckpt", projector_type=PROJ)
    assert cfg.llm.vocab_size == 96 and cfg.image_token_id == 94
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        copied = tmp_path / "ckpt" / orbax_io.HF_DIR / "llm" / f
        assert copied.read_bytes() == (llm / f).read_bytes(), f
    export_vila(tmp_path / "ckpt", tmp_path / "vila")
    wa, wb = WeightSet(llm), WeightSet(tmp_path / "vila" / "llm")
    assert wa.plan() == wb.plan() and wa.index_text == wb.index_text
    for n in wa.names:
        assert wa.read(n).tobytes() == wb.read(n).tobytes(), n


def test_pad_becomes_unk_without_resize(tmp_path):
    """A BOS and an unk, but a different pad: the pad becomes the unk, the table stays."""
    tok = _tokenizer(90, bos=True, unk=True, pad="<|endoftext|>")
    llm, siglip = _source(tmp_path, LLAMA, tok)
    cfg = import_hf_parts(llm, siglip, tmp_path / "ckpt", projector_type=PROJ)
    out_tok = load_tokenizer(tmp_path / "ckpt")
    assert (out_tok.pad_token, len(out_tok), cfg.llm.vocab_size) == ("w1", 92, 96)


def test_opt_out_keeps_table_and_specials(tmp_path):
    llm, siglip = _source(tmp_path, QWEN, _qwen2_tokenizer())
    cfg = import_hf_parts(llm, siglip, tmp_path / "ckpt", projector_type=PROJ, stage1_tokens=False)
    out_tok = load_tokenizer(tmp_path / "ckpt")
    assert out_tok.bos_token is None and out_tok.pad_token == "<|endoftext|>"
    assert cfg.llm.vocab_size == 264 and cfg.image_token_id == 259


def test_tokenizer_past_the_table_is_refused(tmp_path):
    # 98 ordinary tokens for a 96-row table: [BOS] at 98 would leave rows 96, 97 to HF's init.
    llm, siglip = _source(tmp_path, LLAMA, _tokenizer(98, bos=False, unk=False, pad=None))
    with pytest.raises(ConfigError, match="tokenizer.*96 rows.*rows 96..97"):
        import_hf_parts(llm, siglip, tmp_path / "ckpt", projector_type=PROJ)
    assert not (tmp_path / "ckpt").exists()
