"""Fixtures for the evaluation tests: tiny model, a locally trained tokenizer, a haystack video,
needles, and a model whose weights are rigged to emit a chosen token chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers.eval_models import TINY, make_model

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.data.synthetic import NEEDLE_QUESTION, train_tokenizer
from longvila_jax.data.text import QWEN2_SYSTEM, load_tokenizer
from longvila_jax.eval.needles import make_haystack_video, make_needles, write_needles
from longvila_jax.eval.videomme_annotations import OPTION_PROMPT, POST_PROMPT
from longvila_jax.models import LongVILA


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return load_config(ModelConfig, TINY, [])


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> LongVILA:
    return make_model(tiny_cfg)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [
        QWEN2_SYSTEM,
        NEEDLE_QUESTION,
        OPTION_PROMPT,
        POST_PROMPT,
        "system user assistant A. B. C. D. What number is shown in the video?",
        "What colour is the background? red green blue yellow purple orange teal",
        "12 34 56 78 90 apple river tiger",
    ]
    train_tokenizer(texts * 4, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def needles_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("needles")
    write_needles(out, make_needles(2, kind="number", numbers=["37", "52"]))
    return out


@pytest.fixture(scope="session")
def haystack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("haystack") / "haystack.mp4"
    make_haystack_video(path, 10, fps=8, size=64)
    return path


def rig_chain(model: LongVILA, inputs: list[int], outputs: list[int]) -> LongVILA:
    """Sets the LLM weights so that a position holding ``inputs[i]`` predicts ``outputs[i]``.

    Attention and MLP outputs are zeroed (o_proj, down_proj), so the final hidden state at a
    position is the normalised embedding of its own token; the input tokens get one-hot
    embeddings and the head maps dimension i to ``outputs[i]``. For a teacher-forced answer
    ``a`` after a prompt ending in ``c``, ``inputs = [c, *a[:-1]]`` and ``outputs`` is what the
    model should emit. The vision tower and the other tokens are left random.
    """
    succ: dict[int, int] = {}
    for a, b in zip(inputs, outputs, strict=True):
        if succ.setdefault(a, b) != b:
            raise ValueError(f"token {a} would need two successors")
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    llm = pure["llm"]
    d = llm["norm"]["scale"].shape[0]
    emb = np.array(llm["embed_tokens"]["embedding"]) * 0.01
    head = np.zeros_like(np.array(llm["lm_head"]["kernel"]))
    for i, (a, b) in enumerate(succ.items()):
        if i >= d:
            raise ValueError("chain longer than the hidden size")
        emb[a] = 0.0
        emb[a, i] = 8.0
        head[i, b] = 10.0
    llm["embed_tokens"]["embedding"] = emb
    llm["lm_head"]["kernel"] = head
    llm["norm"]["scale"] = np.ones(d, np.float32)
    llm["layers"]["self_attn"]["o_proj"]["kernel"] = np.zeros_like(
        llm["layers"]["self_attn"]["o_proj"]["kernel"]
    )
    llm["layers"]["mlp"]["down_proj"]["kernel"] = np.zeros_like(
        llm["layers"]["mlp"]["down_proj"]["kernel"]
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="session")
def rig():
    return rig_chain
