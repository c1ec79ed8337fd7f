"""The MM-SP trainer objective on real pipeline batches equals the dense objective.

A tiny video stage (synthetic corpus, data pipeline, two micro-batches) is resolved for the 2D
mesh; ``MMSPObjective`` (frames sharded over the SP devices, two-hop re-shard, 2D attention,
chunked psum'd CE) and the trainer's ``DenseObjective`` (every device sees whole rows) must return
the same CE sum and supervised-token count for every micro-batch.

Uneven frames: upstream never rounds ``longvideo_sft`` frame counts to a multiple of the SP
degree; its collator splits the frames unevenly over the ranks (``input_utils.py``
extract_local_from_list). The data side no longer rounds either, so the second case holds one
11-frame needle video per row (``sp_degree`` 8 used to round 11 down to 8).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.stages import video_stage_dict

from longvila_jax.config.base import from_dict
from longvila_jax.config.train import StageConfig
from longvila_jax.data.pipeline import DataIterator
from longvila_jax.data.synthetic import generate
from longvila_jax.models.vlm import LongVILA
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.train.objective import MMSPObjective, make_dense_objective, make_mmsp_objective
from longvila_jax.train.resolve import resolve_stage
from longvila_jax.train.state import ModelTemplate, flatten_model

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
UNEVEN_FRAMES = 11  # not a multiple of the 8 SP devices


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmsp_corpus")
    generate(out, seed=0, size=64, n_images=4, n_videos=4)
    return out


@pytest.fixture(scope="module")
def needle_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmsp_uneven")
    generate(out, seed=0, size=64, n_images=2, n_videos=2, n_needles=(4, 1), needle_frames=32)
    return out


def _stage(corpus: Path, run_dir: Path, inline: dict, **extra) -> StageConfig:
    data = video_stage_dict(
        corpus,
        run_dir,
        {"sp_degree": 8, "batch_size": 2, **inline},
        trainable=[".*"],
        steps=1,
        optim={"lr": 1.0e-3, "warmup_steps": 0, "grad_accum": 2},
        objective="dense",
        **extra,
    )
    if extra:  # the needle videos only
        data["data"]["inline"].update(
            datasets=[{"name": "needle", "manifest": "needle_train.jsonl", "kind": "video"}]
        )
    return from_dict(StageConfig, data)


def _compare(stage: StageConfig) -> dict:
    """Both objectives on the pipeline's first batch; returns that batch."""
    resolved = resolve_stage(stage, num_devices=8)
    mesh = make_mesh(resolved.mesh)
    template = ModelTemplate.build(resolved.model)
    sh = template.shardings(mesh, resolved.mesh.param_rules)
    flat = {
        k: jax.device_put(v, sh[k])
        for k, v in flatten_model(LongVILA(resolved.model, rngs=nnx.Rngs(1))).items()
    }
    mmsp = make_mmsp_objective(resolved, mesh)
    dense = make_dense_objective(resolved, mesh)
    assert isinstance(mmsp, MMSPObjective)
    it = DataIterator(resolved.data)
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["frame_mask"].sum() > 0 and (batch["labels"] >= 0).sum() > 0

    def sums(objective, flat, arrays):
        model = template.merge(flat)
        out = [objective.loss(model, {k: v[m] for k, v in arrays.items()}) for m in range(2)]
        return jax.numpy.stack([jax.numpy.stack(x) for x in out])

    got = {}
    for name, obj in (("mmsp", mmsp), ("dense", dense)):
        arrays = obj.to_device(batch)
        shardings = obj.shardings()
        assert set(arrays) == set(shardings)
        for k, v in arrays.items():
            assert v.sharding.is_equivalent_to(shardings[k], v.ndim), k
        fn = jax.jit(lambda f, a, o=obj: sums(o, f, a))
        got[name] = np.asarray(fn.lower(flat, arrays).compile(FAST_COMPILE)(flat, arrays))
    np.testing.assert_array_equal(got["mmsp"][:, 1], got["dense"][:, 1])  # token counts
    rel = np.abs(got["mmsp"][:, 0] - got["dense"][:, 0]) / np.abs(got["dense"][:, 0])
    assert rel.max() <= 1e-4, (got, rel)
    return batch


@pytest.mark.slow
def test_mmsp_objective_matches_dense_on_pipeline_batches(corpus, tmp_path):
    _compare(_stage(corpus, tmp_path / "run", {"max_frames_per_row": 20}))


@pytest.mark.slow
def test_mmsp_objective_matches_dense_with_uneven_frames(needle_corpus, tmp_path):
    inline = {"max_frames_per_row": 16, "max_segments_per_row": 1}
    stage = _stage(needle_corpus, tmp_path / "run", inline, frames=UNEVEN_FRAMES)
    batch = _compare(stage)
    counts = batch["frame_mask"].sum(-1)
    assert counts.tolist() == [UNEVEN_FRAMES] * counts.size, counts  # uneven over 8 devices
