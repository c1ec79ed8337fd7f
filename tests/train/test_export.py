"""The last stage's export: a stage started from a VILA-layout checkpoint trains LoRA adapters on
the attention kernels with a new RoPE base, and exports the VILA layout with the adapters merged.

The exported weights must equal the stage's final parameters bit for bit (read back with the
converter's own reader), the LoRA-targeted kernels must differ from the source checkpoint, the
untouched ones must not, and the exported LLM config must carry the new RoPE theta.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import vila_fixture as vf
from helpers.harness import stage_dict

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.pretrained import read_vila_params
from longvila_jax.config.base import from_dict, save_yaml
from longvila_jax.config.train import StageConfig
from longvila_jax.train.loop import EXIT_OK, run_stage
from longvila_jax.train.state import unnest

pytestmark = pytest.mark.slow

LORA_RE = "llm/layers/self_attn/(q|k|v|o)_proj/kernel"


@pytest.fixture(scope="module")
def vila_src(tmp_path_factory) -> Path:
    spec = vf.Spec(vocab=520, v_image=64, projector_type="mlp_downsample", layers=2)
    return vf.build_vila(tmp_path_factory.mktemp("vila") / "src", spec)


def test_lora_stage_exports_vila_with_adapters_merged(corpus, vila_src, tmp_path):
    cfg, src = read_vila_params(vila_src)
    save_yaml(cfg, tmp_path / "model.yaml")
    d = stage_dict(
        corpus,
        tmp_path / "run",
        name="extend",
        model=str(tmp_path / "model.yaml"),
        init_from=str(vila_src),
        trainable=["llm/.*norm.*"],
        lora={"rank": 4, "alpha": 8, "targets": [LORA_RE]},
        rope={"theta": 2.5e7},
        seq_len=512,
        steps=2,
        export_vila=True,
    )
    d["data"]["inline"].update(
        datasets=[{"name": "text", "manifest": "text.jsonl", "kind": "text"}],
        max_frames_per_row=0,
    )
    stage = from_dict(StageConfig, d)
    assert run_stage(stage, progress=False) == EXIT_OK
    run = tmp_path / "run"
    final = {k: np.asarray(v) for k, v in unnest(orbax_io.load_params(run / "final")).items()}
    cfg_out, exported = read_vila_params(run / "vila")
    exported = {k: np.asarray(v) for k, v in unnest(exported).items()}
    source = {k: np.asarray(v) for k, v in unnest(src).items()}
    assert set(exported) == set(final) == set(source)
    for n in final:
        assert np.array_equal(exported[n], final[n]), f"{n}: export != final params"
        adapted = bool(re.fullmatch(LORA_RE, n)) or bool(re.fullmatch("llm/.*norm.*", n))
        assert (not np.array_equal(final[n], source[n])) == adapted, n
    assert cfg_out.llm.rope_theta == 2.5e7
    assert (run / "vila" / "llm" / "config.json").is_file()
