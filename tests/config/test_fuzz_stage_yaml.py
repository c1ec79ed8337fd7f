"""Fuzz: stage YAML files (``config.train.load_stage``) and the cheap part of resolving them.

Each example mutates one of ``configs/stages/demo_s1.yaml`` .. ``demo_s5.yaml`` or
``s5_long_sft_256f.yaml`` (structured and byte-level edits as for model YAML; the vocabulary
adds stage values: ``init_from`` forms, regexes that ``re`` refuses in unusual ways, dotted
``--set`` overrides with hostile YAML, paths to special files). A stage that loads is then
taken through ``model_config`` and ``data_config`` (the model and data YAML it names, with its
``model_set`` / ``data.set`` / RoPE overrides) and ``stage_fingerprint``; ``resolve_stage``
needs devices and is left out. Runs from the repository root (stage paths are relative).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.fuzz_mutations import FUZZ, Vocab, pick
from helpers.fuzz_outcome import outcome
from helpers.fuzz_texts import yaml_inputs
from hypothesis import given
from hypothesis import strategies as st

from longvila_jax.config.train import LoraConfig, OptimConfig, RopeConfig, StageConfig, load_stage
from longvila_jax.train.fingerprint import stage_fingerprint
from longvila_jax.train.resolve import data_config, model_config

REPO = Path(__file__).resolve().parents[2]
STAGES = [f"demo_s{i}.yaml" for i in range(1, 6)] + ["s5_long_sft_256f.yaml"]
BASES = {name: (REPO / "configs/stages" / name).read_bytes() for name in STAGES}
FIELDS = [*StageConfig.__dataclass_fields__, *OptimConfig.__dataclass_fields__]
FIELDS += [*RopeConfig.__dataclass_fields__, *LoraConfig.__dataclass_fields__, "file", "inline"]
REGEXES = ("projector/.*", ".*", "(", "a{4294967296}", "(" * 1000 + ")" * 1000, "[z-a]", "\\")
OVERRIDES = ("batch_size=4", "llm.rope_theta=abc", "llm=5", "=", "a..b=1", "max_length=1e400")
OVERRIDES += ("batch_size=!!python/object/apply:os.system [x]", "num_video_frames=[", "x=&a [*a]")
OVERRIDES += ("llm.rope_scaling={type: linear, factor: 0.5}", "datasets=[{name: a}]", "seed=")
OVERRIDES += ("remat=" + "1:" * 3000 + "1", "max_length=" + "1:" * 3000 + "1")
OVERRIDES += ("llm.rope_scaling=linear", "vision.image_size=2**64", "remat=\ud800", "a.b.c.d=1")
PATHS = (
    "configs/model/tiny-llama.yaml",
    "configs/stages/demo_s1.yaml",
    "configs/data/synthetic.yaml",
)
PATHS += ("configs", "/dev/zero", "/proc/self/mem", "missing.yaml", "configs/mesh/cpu8_r8.yaml")
VOCAB = Vocab(
    keys=tuple(FIELDS),
    values=("random", "stage:demo_s1", "stage:demo_s4", "stage:", "hf:a|b", "hf:|", "mmsp", "dense")
    + REGEXES
    + OVERRIDES
    + PATHS
    + ([".*"], [], ["("], ["a{4294967296}"], [OVERRIDES[0]], ["batch_size=2", "batch_size=3"])
    + ({"rank": 4, "alpha": 8.0, "targets": [".*"]}, {"theta": -1.0}, {"scaling_factor": 0.5})
    + (0, 1, -1, 512, 2**31, 0.03, 1.0, 2e-5),
    fields={
        **dict.fromkeys(("trainable", "targets"), REGEXES),
        **dict.fromkeys(("set", "model_set", "mesh_set"), OVERRIDES),
        **dict.fromkeys(("model", "file", "mesh", "run_dir"), PATHS),
        "init_from": ("stage:demo_s1", "stage:", "stage:" + "x" * 5000, "hf:a|b", "hf:|", "random"),
    },
)


@st.composite
def stage_yaml_cases(draw) -> bytes:
    return draw(yaml_inputs(BASES[pick(draw, STAGES)], VOCAB))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    old = os.getcwd()
    os.chdir(REPO)
    try:
        yield tmp_path_factory.mktemp("fuzz_stage_yaml")
    finally:
        os.chdir(old)


def check_stage_yaml(root: Path, text: bytes) -> None:
    path = root / "stage.yaml"
    path.write_bytes(text)
    stage = outcome(lambda: load_stage(path), (str(path),))
    if stage is None:
        return
    stage_fingerprint(stage)
    outcome(lambda: model_config(stage), (stage.model,))
    outcome(lambda: data_config(stage), (stage.data.file,))


@FUZZ
@given(text=stage_yaml_cases())
def test_stage_yaml_mutations(workdir, text):
    check_stage_yaml(workdir, text)
