"""Tokenizer, chat templates, the longvila.md §3.4 token layout and assistant-only labels."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import ConfigError
from longvila_jax.data import text as T
from longvila_jax.data.synthetic import SPECIAL_TOKENS


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_tokenizer_special_tokens(tokenizer, corpus):
    assert len(tokenizer) <= 512
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(8))
    assert T.image_token_id(tokenizer) == 3
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    # Each special token is one id even when glued to text.
    assert _ids(tokenizer, "a<image>\n<|im_end|>b").count(3) == 1
    cfg = json.loads((corpus / "tokenizer" / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg


def test_load_tokenizer_rejects_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        T.load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_refuses_fifos_and_links_out(corpus, tmp_path):
    # transformers would block forever on a FIFO tokenizer.json, or read a host file.
    d = tmp_path / "tok"
    shutil.copytree(corpus / "tokenizer", d)
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    with time_limit(20), pytest.raises(ConfigError, match="tokenizer_dir: .*FIFO"):
        T.load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    (tmp_path / "host.json").write_text((corpus / "tokenizer" / "tokenizer.json").read_text())
    (d / "tokenizer.json").symlink_to(tmp_path / "host.json")
    with pytest.raises(ConfigError, match="symlink to a file outside"):
        T.load_tokenizer(d)


def test_media_prompt_layout():
    assert T.media_prompt("<video>\n What is it?", 3) == "<image>\n<image>\n<image>\nWhat is it?"
    assert T.media_prompt("Q?", 0) == "Q?"


def test_qwen2_layout_and_labels(tokenizer):
    """ChatML layout of longvila.md §3.5 with 2 frames; labels = reply + <|im_end|> only."""
    q = T.media_prompt("<video>\nWhat number appears in the video?", 2)
    enc = T.encode_conversation(
        tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": "42"}]
    )
    im_start, im_end, nl = 1, 2, _ids(tokenizer, "\n")
    expected_prefix = (
        [im_start]
        + _ids(tokenizer, "system\nYou are a helpful assistant")
        + [im_end]
        + nl
        + [im_start]
        + _ids(tokenizer, "user\n")
        + [3]
        + nl
        + [3]
        + nl
    )
    ids = enc.input_ids.tolist()
    assert ids[: len(expected_prefix)] == expected_prefix
    reply = _ids(tokenizer, "42")
    tail = [im_start] + _ids(tokenizer, "assistant\n") + reply + [im_end] + nl
    assert ids[-len(tail) :] == tail
    sup = np.flatnonzero(enc.supervised)
    # Supervised = exactly the reply tokens and the end token right after them.
    n = len(ids)
    assert sup.tolist() == list(range(n - 1 - len(reply) - 1, n - 1))
    assert int(np.sum(enc.input_ids == 3)) == 2


def test_llama3_multiturn_labels(tokenizer):
    msgs = [
        {"role": "user", "content": "<image>\nWhich colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "What number is shown?"},
        {"role": "assistant", "content": "7"},
    ]
    enc = T.encode_conversation(tokenizer, msgs, template="llama_3")
    ids = enc.input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # Two supervised runs, each the reply followed by <|eot_id|>.
    runs = np.split(
        np.flatnonzero(enc.supervised),
        np.flatnonzero(np.diff(np.flatnonzero(enc.supervised)) > 1) + 1,
    )
    assert [tokenizer.decode(ids[r]) for r in runs] == ["red<|eot_id|>", "7<|eot_id|>"]
    assert all(ids[r[-1]] == eot for r in runs)
    assert "You are a helpful language and vision assistant" in tokenizer.decode(ids)


def test_system_prompt_override_and_injection(tokenizer):
    enc = T.encode_conversation(
        tokenizer,
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        system_prompt="Be short.",
    )
    text = tokenizer.decode(enc.input_ids)
    assert "Be short." in text and "helpful assistant" not in text
    from longvila_jax.data.skips import SampleSkipped

    with pytest.raises(SampleSkipped, match="bad_record"):
        T.encode_conversation(
            tokenizer,
            [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}],
        )


def test_document_supervision(tokenizer):
    enc = T.encode_document(tokenizer, "<image> red one. <image> blue one.")
    assert int(np.sum(enc.input_ids == 3)) == 2
    assert not enc.supervised[enc.input_ids == 3].any()
    assert enc.supervised[enc.input_ids != 3].all()
    assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_synthetic_corpus_is_deterministic(tmp_path):
    from longvila_jax.data.synthetic import generate

    generate(tmp_path / "a", seed=7, size=32, n_images=4, n_videos=2)
    generate(tmp_path / "b", seed=7, size=32, n_images=4, n_videos=2)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) > 20
    for rel in files:
        if rel.name != "data.yaml":  # holds the absolute root
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
