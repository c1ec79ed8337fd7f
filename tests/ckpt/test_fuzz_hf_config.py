"""Fuzz: HF / VILA ``config.json`` files (``hf_config.read_vila``, ``llm_fields``,
``vision_fields``) and the ``ModelConfig`` built from them (``apply_overrides``, as
``hf_config.build_config`` does without a tokenizer).

Three tiny VILA layouts (Qwen2 with ``rope_theta``; Llama with legacy ``rope_scaling`` and a
full SigLIP config; Llama with transformers-5 ``rope_parameters`` under a remote-code
``config.json`` plus ``config_vila_style.json``) are written once; each example mutates one or
two of their JSON files (structured and byte-level edits; field-aware tweaks put strings in
``rope_scaling`` / ``rope_theta``, lists where objects belong...). A layout that reads must
have passed the checked JSON loader (no duplicate keys, NaN, deep nesting). A second test feeds
structured edits of the LLM and vision dicts straight to ``llm_fields`` / ``vision_fields``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers.fuzz_mutations import FUZZ, Vocab, edits, ints, pick
from helpers.fuzz_outcome import checked_loader_refusal, outcome, write_if_changed
from helpers.fuzz_texts import json_inputs
from hypothesis import given
from hypothesis import strategies as st

from longvila_jax.ckpt.hf_config import llm_fields, read_vila, vision_fields
from longvila_jax.config.base import apply_overrides
from longvila_jax.config.model import ModelConfig

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LLAMA = {
    **{k: v for k, v in QWEN2.items() if k not in ("use_sliding_window", "rope_theta")},
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_attention_heads": 8,
    "head_dim": 8,
    "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
}
LLAMA_V5 = {
    **{k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")},
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
}
SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": 64,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
SIGLIP_FULL = {"model_type": "siglip", "vision_config": SIGLIP, "text_config": {"vocab_size": 9}}


def top(llm: dict, vision: dict, projector: str, **extra) -> dict:
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": copy.deepcopy(llm),
        "vision_tower_cfg": copy.deepcopy(vision),
        "mm_projector_cfg": {"mm_projector_type": projector},
        "hidden_size": llm["hidden_size"],
        "mm_hidden_size": SIGLIP["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        **extra,
    }


REMOTE = {"model_type": "vila", "auto_map": {"AutoConfig": "auto_processor.VILAConfig"}}
LAYOUTS = {  # layout name: {relative file: document}
    "qwen2": {
        "config.json": top(QWEN2, SIGLIP, "mlp_downsample_2x2_fix", chat_template=None),
        "llm/config.json": QWEN2,
        "vision_tower/config.json": SIGLIP,
        "mm_projector/config.json": {"mm_projector_type": "mlp_downsample_2x2_fix"},
    },
    "llama": {
        "config.json": top(LLAMA, SIGLIP_FULL, "mlp_downsample"),
        "llm/config.json": LLAMA,
        "vision_tower/config.json": SIGLIP_FULL,
        "mm_projector/config.json": {"mm_projector_type": "mlp_downsample"},
    },
    "llama_v5": {
        "config.json": REMOTE,
        "config_vila_style.json": top(LLAMA_V5, SIGLIP, "mlp_downsample_3x3_fix"),
        "llm/config.json": LLAMA_V5,
        "vision_tower/config.json": SIGLIP,
        "mm_projector/config.json": {"mm_projector_type": "mlp_downsample_3x3_fix"},
    },
}
KEYS = {k for layout in LAYOUTS.values() for doc in layout.values() for k in doc}
VALUES = ("qwen2", "llama", "siglip", "siglip_vision_model", "silu", "gelu", "linear", "default")
VALUES += ("dynamic", "yarn", "mlp_downsample", "mlp2x_gelu", "cls_patch", "patch", -2, 0, 4, 64)
VOCAB = Vocab(
    keys=tuple(sorted(KEYS | {"rope_type", "type", "factor", "rope_theta", "vision_config"})),
    values=VALUES + ({"type": "linear", "factor": 0.5}, {"rope_type": "dynamic"}, "linear"),
    fields={
        **dict.fromkeys(
            ("rope_scaling", "rope_parameters"),
            ("linear", ["linear"], {"type": "linear", "factor": "x"}, {"rope_type": "yarn"}, 4.0),
        ),
        **dict.fromkeys(("rope_theta", "factor"), ("abc", "1e400", [], {}, -1.0, 0, "inf")),
        "model_type": ("siglip", "llama", "qwen2", "vila", ["qwen2"], None, "x" * 5000),
        "vision_config": ([], "x", None, {"model_type": "clip"}, [{"hidden_size": 32}]),
        "mm_projector_type": ("linear", "mlp_downsample_9x9", ["linear"], None, 3),
    },
)


@st.composite
def vila_cases(draw) -> tuple[str, dict[str, bytes]]:
    """(layout, {file: mutated bytes}) for one or two mutated files of one layout."""
    layout = pick(draw, sorted(LAYOUTS))
    files = sorted(LAYOUTS[layout])
    names = sorted({pick(draw, files) for _ in range(draw(ints(1, 2)))})
    return layout, {name: draw(json_inputs(LAYOUTS[layout][name], VOCAB)) for name in names}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return setup(tmp_path_factory.mktemp("fuzz_hf_config"))


def setup(root: Path) -> Path:
    for layout in LAYOUTS:
        for sub in ("llm", "vision_tower", "mm_projector"):
            (root / layout / sub).mkdir(parents=True)
    return root


def check_vila(root: Path, case: tuple[str, dict[str, bytes]]) -> None:
    layout, mutated = case
    folder = root / layout
    texts = {rel: json.dumps(doc).encode() for rel, doc in LAYOUTS[layout].items()} | mutated
    for rel, text in texts.items():
        write_if_changed(folder / rel, text)
    got = outcome(lambda: read_vila(folder), list(texts))
    if got is None:
        return
    for text in mutated.values():
        refusal = checked_loader_refusal(text)
        assert refusal is None, f"accepted a config the checked loader refuses: {refusal}"
    data, _ = got
    outcome(lambda: apply_overrides(ModelConfig, data, ()))


@FUZZ
@given(case=vila_cases())
def test_vila_config_mutations(workdir, case):
    check_vila(workdir, case)


FIELDS = {"llm": (QWEN2, LLAMA, LLAMA_V5), "vision": (SIGLIP, SIGLIP_FULL)}


@st.composite
def field_cases(draw) -> tuple[str, dict]:
    part = pick(draw, sorted(FIELDS))
    return part, draw(edits(pick(draw, FIELDS[part]), VOCAB))


def check_fields(case: tuple[str, dict]) -> None:
    part, doc = case
    if not isinstance(doc, dict):  # read_json admits JSON objects only
        return
    if part == "llm":
        llm = outcome(lambda: llm_fields(doc))
        data = None if llm is None else {"llm": llm}
    else:
        vision = outcome(lambda: vision_fields(doc))
        data = None if vision is None else {"vision": {**vision, "select_layer": -2}}
    if data is not None:
        outcome(lambda: apply_overrides(ModelConfig, data, ()))


@FUZZ
@given(case=field_cases())
def test_llm_and_vision_field_mutations(case):
    check_fields(case)
