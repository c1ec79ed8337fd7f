"""Stage transitions: trainable sets, frozen params bitwise unchanged, no optimizer state for
them, ``init_from: stage:<name>``, LoRA merged into the next stage's input, RoPE change carried.

Two stages run in-process (``run_stage``) on 8 simulated CPU devices from a project checkpoint
written by the test: stage ``a`` trains the projector only; stage ``b`` starts from ``a``'s
output, trains embeddings and norms plus LoRA adapters on the attention kernels and raises the
RoPE base, as the context-extension stage does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.harness import TINY_MODEL, stage_dict

from longvila_jax.ckpt import orbax_io
from longvila_jax.config.base import from_dict, load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import StageConfig
from longvila_jax.train.loop import EXIT_OK, run_stage, write_final
from longvila_jax.train.state import ModelTemplate, unnest

pytestmark = pytest.mark.slow

LORA_RE = "llm/layers/self_attn/(q|k|v|o)_proj/kernel"


def _load(ckpt: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in unnest(orbax_io.load_params(ckpt)).items()}


def _opt_param_names(run: Path) -> tuple[set[str], set[str]]:
    """Names of the parameters (and LoRA leaves) holding Adam moments in the last checkpoint."""
    import orbax.checkpoint as ocp

    ck = run / "checkpoints"
    step = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    meta = ocp.StandardCheckpointer().metadata(ck / str(step) / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree

    def find_mu(node):
        if isinstance(node, dict):
            if "mu" in node:
                return node["mu"]
            node = list(node.values())
        for child in node if isinstance(node, (list, tuple)) else ():
            found = find_mu(child)
            if found is not None:
                return found
        return None

    mu = find_mu(tree["opt"])
    assert mu is not None, "no Adam moments in the checkpoint"
    return set(unnest(mu["params"])), set(unnest(mu.get("lora", {})))


def test_two_stage_pipeline(corpus, tmp_path):
    cfg = load_config(ModelConfig, TINY_MODEL)
    template = ModelTemplate.build(cfg)
    rng = np.random.default_rng(0)
    init = {
        n: (
            np.ones(s.shape, s.dtype)
            if n.endswith("scale")
            else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
        )
        for n, s in template.shapes.items()
    }
    write_final(tmp_path / "init_ckpt", cfg, init, like=None)
    pipe = tmp_path / "pipe"

    a = from_dict(
        StageConfig,
        stage_dict(
            corpus,
            pipe / "a",
            name="a",
            init_from=str(tmp_path / "init_ckpt"),
            trainable=["projector/.*"],
            steps=2,
        ),
    )
    assert run_stage(a, progress=False) == EXIT_OK
    out_a = _load(pipe / "a" / "final")
    for n, v in out_a.items():
        same = np.array_equal(v, init[n])
        assert same != n.startswith("projector/"), f"{n}: trainable={n.startswith('projector/')}"
    mu_params, mu_lora = _opt_param_names(pipe / "a")
    assert mu_params == {n for n in init if n.startswith("projector/")} and not mu_lora

    b = from_dict(
        StageConfig,
        stage_dict(
            corpus,
            pipe / "b",
            name="b",
            init_from="stage:a",
            trainable=["llm/embed_tokens/.*", "llm/.*norm.*"],
            lora={"rank": 4, "alpha": 8, "targets": [LORA_RE]},
            rope={"theta": 123456.0},
            steps=2,
        ),
    )
    assert run_stage(b, progress=False) == EXIT_OK
    out_b = _load(pipe / "b" / "final")
    import re

    trainable_b = {
        n for n in out_a if n.startswith("llm/embed_tokens/") or re.fullmatch("llm/.*norm.*", n)
    }
    lora_b = {n for n in out_a if re.fullmatch(LORA_RE, n)}
    assert len(lora_b) == 4 and trainable_b
    for n, v in out_b.items():
        changed = not np.array_equal(v, out_a[n])
        # Stage b starts from a's output: frozen leaves keep a's exact bits; trained and
        # LoRA-adapted (merged) kernels move.
        assert changed == (n in trainable_b | lora_b), n
    mu_params, mu_lora = _opt_param_names(pipe / "b")
    assert mu_params == trainable_b
    assert mu_lora == {f"{n}/{ab}" for n in lora_b for ab in ("a", "b")}
    cfg_b = orbax_io.read_model_config(pipe / "b" / "final")
    assert cfg_b.llm.rope_theta == 123456.0
    assert cfg_b.vision == cfg.vision
    # Rerunning a finished stage is a no-op.
    assert run_stage(b, progress=False) == EXIT_OK
