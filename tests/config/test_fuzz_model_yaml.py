"""Fuzz: model YAML files (``config.base.load_config(ModelConfig, path)``).

Each example mutates ``configs/model/tiny-qwen2.yaml`` or ``tiny-llama.yaml``: structured edits
of the parsed document (values replaced at random paths, deletions, unknown keys, type swaps,
deep nesting, shared subtrees written as anchors/aliases), byte-level edits of the original
text (duplicate keys, unsafe tags such as ``!!python/object/apply:os.system``, anchors, merge
keys, flips, truncation) or a hostile whole document (alias bombs, recursive aliases, deep
nesting, several documents). A config that loads must also answer its derived properties.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.fuzz_mutations import FUZZ, Vocab, pick
from helpers.fuzz_outcome import outcome
from helpers.fuzz_texts import yaml_inputs
from hypothesis import given
from hypothesis import strategies as st

from longvila_jax.config.base import load_config
from longvila_jax.config.model import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig

REPO = Path(__file__).resolve().parents[2]
BASES = {
    name: (REPO / "configs/model" / name).read_bytes()
    for name in ("tiny-qwen2.yaml", "tiny-llama.yaml")
}
FIELDS = [*ModelConfig.__dataclass_fields__, *LLMConfig.__dataclass_fields__]
FIELDS += [*VisionConfig.__dataclass_fields__, *ProjectorConfig.__dataclass_fields__]
VOCAB = Vocab(
    keys=(*FIELDS, "factor"),
    values=("qwen2", "llama", "linear", "mlp_downsample", "mlp_downsample_3x3_fix", "row_major")
    + ("col_major", "float32", "bfloat16", "none", "silu", "gelu", -2, 0, 1, 3, 7, 64, 1.0e-6)
    + ({"type": "linear", "factor": 0.5}, {"type": "dynamic"}, "1e-5", "10000"),
)


@st.composite
def model_yaml_cases(draw) -> bytes:
    return draw(yaml_inputs(BASES[pick(draw, sorted(BASES))], VOCAB))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_model_yaml")


def check_model_yaml(root: Path, text: bytes) -> None:
    path = root / "model.yaml"
    path.write_bytes(text)
    cfg = outcome(lambda: load_config(ModelConfig, path), (str(path),))
    if cfg is not None:
        assert cfg.tokens_per_frame >= 1
        assert cfg.llm.dim_per_head >= 1 and cfg.vision.head_dim >= 1
        assert 0 <= cfg.vision.layers_used <= cfg.vision.num_hidden_layers
        assert cfg.llm.rope_position_scale >= 1.0


@FUZZ
@given(text=model_yaml_cases())
def test_model_yaml_mutations(workdir, text):
    check_model_yaml(workdir, text)
