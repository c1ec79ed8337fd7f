"""Stage configs: every shipped YAML validates; malformed stage/mesh/data configs are rejected
before any compilation, naming the field (reliability scenario 10); the real stage-5 config
traces on an abstract 256-device mesh without allocating anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from helpers.xla_env import xla_flags

from longvila_jax.config.base import ConfigError, load_config
from longvila_jax.config.data import DataConfig
from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import load_stage
from longvila_jax.parallel.mesh import load_mesh_config
from longvila_jax.train.resolve import resolve_stage

ROOT = Path(__file__).resolve().parents[2]
STAGES = sorted((ROOT / "configs/stages").glob("*.yaml"))
MESHES = sorted((ROOT / "configs/mesh").glob("*.yaml"))
DATAS = sorted((ROOT / "configs/data").glob("*.yaml"))
MODELS = sorted((ROOT / "configs/model").glob("*.yaml"))
TINY = str(ROOT / "configs/model/tiny-qwen2.yaml")
MESH = str(ROOT / "configs/mesh/cpu8_r2u4.yaml")


def _devices(mesh_file: str) -> int:
    """Device count a mesh file is written for (its name: cpu8_..., gpu256_...)."""
    return int(re.search(r"(\d+)_", Path(mesh_file).name).group(1))


def test_the_recipe_and_demo_stages_are_shipped():
    names = {p.stem for p in STAGES}
    assert {"s1_align", "s2_pretrain", "s3_sft"} <= names
    assert {f"s4_extend_{k}" for k in ("64k", "256k", "512k", "1m")} <= names
    assert {f"s5_long_sft_{f}f" for f in (256, 512, 1024, 2048)} <= names
    assert {f"demo_s{i}" for i in range(1, 6)} <= names


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.stem)
def test_every_stage_yaml_validates(path):
    stage = load_stage(path)
    r = resolve_stage(stage, num_devices=_devices(stage.mesh), check_files=False)
    assert r.trainable_paths and r.data.row_length == stage.seq_len
    assert r.model.tokens_per_frame == r.data.tokens_per_frame


def test_recipe_values_follow_longvila_md():
    s4 = {
        k: load_stage(ROOT / f"configs/stages/s4_extend_{k}.yaml")
        for k in ("64k", "256k", "512k", "1m")
    }
    theta = {k: s.rope.theta for k, s in s4.items()}
    assert theta == {
        "64k": 15_300_000,
        "256k": 207_112_184,
        "512k": 1_062_356_830,
        "1m": 3_580_165_449,
    }
    assert [s4[k].steps for k in ("64k", "256k", "512k", "1m")] == [40, 80, 80, 50]
    assert [s4[k].optim.grad_accum for k in ("64k", "256k", "512k", "1m")] == [4, 16, 16, 4]
    for s in s4.values():
        assert s.optim.lr == 2e-5 and s.optim.schedule == "constant" and s.lora.rank == 8
    s5 = {
        f: load_stage(ROOT / f"configs/stages/s5_long_sft_{f}f.yaml")
        for f in (256, 512, 1024, 2048)
    }
    assert {f: s.seq_len for f, s in s5.items()} == {
        256: 131072,
        512: 262144,
        1024: 262144,
        2048: 524288,
    }
    assert {f: s.optim.lr for f, s in s5.items()} == {256: 2e-5, 512: 5e-5, 1024: 5e-5, 2048: 5e-5}
    assert s5[2048].export_vila
    s1 = load_stage(ROOT / "configs/stages/s1_align.yaml")
    assert s1.trainable == ("projector/.*",) and s1.optim.lr == 1e-3 and s1.seq_len == 4096


def _llm_shapes(shapes: dict) -> dict:
    return {k: v for k, v in shapes.items() if k.startswith("llm/")}


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.stem)
def test_init_chain_is_loadable(path):
    """``stage:X`` needs X's final checkpoint to hold this stage's exact parameter tree
    (``train.start.runtime_model``); ``hf:runs/.../X/vila/llm|<siglip>`` (a new tower, as the
    384 px stage-5 rungs) needs X to export the VILA layout with this stage's LLM tree."""
    from longvila_jax.train.state import abstract_param_paths

    stage = load_stage(path)
    source = stage.init_from
    if not (source.startswith("stage:") or source.startswith("hf:runs/")):
        return  # random, or an outside checkpoint (hf: /checkpoints/...)
    if source.startswith("stage:"):
        prev_name, part = source[len("stage:") :], "all"
    else:
        llm_dir = Path(source[3:].split("|")[0])
        assert llm_dir.parts[-2:] == ("vila", "llm"), source
        assert llm_dir.parent.parent.parent == Path(stage.run_dir).parent, source
        prev_name, part = llm_dir.parent.parent.name, "llm"
    prev = load_stage(ROOT / f"configs/stages/{prev_name}.yaml")
    assert Path(prev.run_dir).name == prev_name
    mine = resolve_stage(stage, num_devices=_devices(stage.mesh), check_files=False).model
    theirs = resolve_stage(prev, num_devices=_devices(prev.mesh), check_files=False).model
    mine_shapes = abstract_param_paths(mine, with_shapes=True)
    their_shapes = abstract_param_paths(theirs, with_shapes=True)
    if part == "all":
        assert mine_shapes == their_shapes
    else:
        assert prev.export_vila, f"{prev_name} must export vila/ for {stage.name}"
        assert _llm_shapes(mine_shapes) == _llm_shapes(their_shapes)
        assert mine.vision.image_size != theirs.vision.image_size  # why the tower is new


@pytest.mark.parametrize("path", MESHES, ids=lambda p: p.stem)
def test_every_mesh_yaml_validates(path):
    cfg = load_mesh_config(path)
    assert np.prod(list(cfg.sizes(_devices(str(path))).values())) == _devices(str(path))


@pytest.mark.parametrize("path", DATAS, ids=lambda p: p.stem)
def test_every_data_yaml_validates(path):
    cfg = load_config(DataConfig, path)
    assert cfg.row_length % cfg.pad_multiple == 0 and cfg.max_length <= cfg.row_length
    assert cfg.text_length <= cfg.row_length
    # Each shipped data file serves a stage, and its geometry fits that stage's model.
    users = [s for s in map(load_stage, STAGES) if Path(s.data.file).name == path.name]
    assert users, f"no stage uses {path.name}"
    for stage in users:
        r = resolve_stage(stage, num_devices=_devices(stage.mesh), check_files=False)
        assert r.data.image_size == r.model.vision.image_size, stage.name
        assert r.data.tokens_per_frame == r.model.tokens_per_frame, stage.name


# Visual tokens per frame: (image_size // patch_size) patches per side, merged k x k by the
# projector (2 x 2 for mlp_downsample*): 384 px -> 27 -> ceil(27 / 2) = 14 -> 196 tokens, as in
# the LongVILA paper; 448 px -> 32 -> 16 -> 256 (NVILA-era towers).
TOKENS_PER_FRAME = {
    "llama3-longvila-8b": (384, 196),
    "qwen2-1.5b-longvila-256f": (384, 196),
    "qwen2-7b-longvila-1m": (384, 196),
    "qwen2-7b-longvila-256f": (448, 256),
    "qwen2-7b-longvila-384": (384, 196),
    "longvila-r1-7b": (448, 256),
    "tiny-qwen2": (64, 4),
    "tiny-llama": (70, 9),
}


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_every_model_yaml_validates(path):
    cfg = load_config(ModelConfig, path)
    assert (cfg.vision.image_size, cfg.tokens_per_frame) == TOKENS_PER_FRAME[path.stem]


# ------------------------------------------------------------------ malformed configs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from longvila_jax.data.synthetic import generate

    out = tmp_path_factory.mktemp("cfg_corpus")
    generate(out, seed=0, size=64, n_images=4, n_videos=2)
    return out


def _base(corpus: Path, run: Path) -> dict:
    return {
        "name": "bad",
        "model": TINY,
        "init_from": "random",
        "trainable": ["projector/.*"],
        "data": {
            "inline": {
                "root": str(corpus),
                "datasets": [{"name": "images", "manifest": "images.jsonl", "kind": "image"}],
                "image_size": 64,
                "tokens_per_frame": 4,
                "batch_size": 2,
                "pad_multiple": 16,
            }
        },
        "seq_len": 128,
        "steps": 4,
        "mesh": MESH,
        "run_dir": str(run),
    }


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    if value is _DEL:
        d.pop(last)
    else:
        d[last] = value


_DEL = object()
LORA = {"rank": 8, "alpha": 16, "targets": ["llm/layers/self_attn/q_proj/kernel"]}

# (case id, [(dotted key, value)], expected dotted field of the ConfigError)
MALFORMED = [
    ("unknown_key", [("foo", 1)], "foo"),
    ("steps_wrong_type", [("steps", "ten")], "steps"),
    ("steps_zero", [("steps", 0)], "steps"),
    ("negative_lr", [("optim.lr", -1.0)], "optim.lr"),
    ("nan_lr", [("optim.lr", float("nan"))], "optim.lr"),
    ("two_warmups", [("optim.warmup_steps", 3), ("optim.warmup_ratio", 0.1)], "optim.warmup_ratio"),
    ("bad_schedule", [("optim.schedule", "linear")], "optim.schedule"),
    ("grad_accum_zero", [("optim.grad_accum", 0)], "optim.grad_accum"),
    ("grad_accum_not_dividing_batch", [("optim.grad_accum", 3)], "optim.grad_accum"),
    ("negative_clip", [("optim.clip_norm", -1.0)], "optim.clip_norm"),
    ("b2_one", [("optim.b2", 1.0)], "optim.b2"),
    ("freeze_regex_matches_nothing", [("trainable", ["vision_tower/.*"])], "trainable[0]"),
    ("invalid_regex", [("trainable", ["llm/(("])], "trainable[0]"),
    ("no_trainable", [("trainable", [])], "trainable"),
    ("lora_target_matches_nothing", [("lora", dict(LORA, targets=["nope"]))], "lora.targets[0]"),
    ("lora_target_also_trainable", [("trainable", ["llm/.*"]), ("lora", LORA)], "lora.targets"),
    ("lora_on_a_vector", [("lora", dict(LORA, targets=["llm/norm/scale"]))], "lora.targets"),
    ("lora_rank_zero", [("lora", dict(LORA, rank=0))], "lora.rank"),
    ("keep_one", [("checkpoint.keep", 1)], "checkpoint.keep"),
    ("every_zero", [("checkpoint.every", 0)], "checkpoint.every"),
    ("seq_not_multiple_of_pad", [("seq_len", 120)], "seq_len"),
    (
        "seq_not_divisible_by_2_ring_ulysses",
        [("seq_len", 120), ("data.inline.pad_multiple", 1)],
        "mesh.seq_len",
    ),
    ("seq_beyond_max_positions", [("seq_len", 8192)], "seq_len"),
    (
        "missing_dataset_manifest",
        [("data.inline.datasets", [{"name": "x", "manifest": "missing.jsonl", "kind": "image"}])],
        "data.datasets[0].manifest",
    ),
    ("no_datasets", [("data.inline.datasets", [])], "data.datasets"),
    ("data_file_and_inline", [("data.file", "configs/data/synthetic.yaml")], "data.file"),
    (
        "data_file_missing",
        [("data.inline", _DEL), ("data.file", "configs/data/nope.yaml")],
        "data.file",
    ),
    ("data_unknown_key", [("data.inline.bogus", 1)], "data.inline.bogus"),
    ("data_image_size_vs_model", [("data.inline.image_size", 32)], "data.image_size"),
    ("data_negative_batch", [("data.inline.batch_size", -2)], "data.inline.batch_size"),
    ("model_yaml_missing", [("model", "configs/model/nope.yaml")], "model"),
    ("model_override_unknown", [("model_set", ["llm.nope=1"])], "model_set.llm.nope"),
    ("mesh_file_missing", [("mesh", "configs/mesh/nope.yaml")], "mesh"),
    ("mesh_product_not_devices", [("mesh_set", ["data=2"])], "mesh.data*fsdp*ring*ulysses"),
    ("mesh_two_fill_axes", [("mesh_set", ["data=-1", "fsdp=-1"])], "mesh.fsdp"),
    ("ulysses_not_dividing_heads", [("mesh_set", ["ring=1", "ulysses=8"])], "mesh.ulysses"),
    (
        "batch_not_divisible_by_data_axis",
        [("mesh_set", ["data=8", "ring=1", "ulysses=1"])],
        "mesh.batch_size",
    ),
    (
        "mesh_unknown_axis_in_rules",
        [("mesh_set", ["activation_rules.batch=[dataa]"])],
        "mesh.activation_rules.batch",
    ),
    ("init_from_empty_stage", [("init_from", "stage:")], "init_from"),
    ("init_from_bad_hf", [("init_from", "hf:only_one_dir")], "init_from"),
    ("bad_name", [("name", "Bad Name")], "name"),
    ("export_vila_wrong_type", [("export_vila", "yes")], "export_vila"),
    ("negative_rope_theta", [("rope", {"theta": -1.0})], "rope.theta"),
    ("unknown_objective", [("objective", "magic")], "objective"),
    ("zero_nonfinite_budget", [("max_consecutive_nonfinite", 0)], "max_consecutive_nonfinite"),
]


def test_there_are_at_least_25_malformed_cases(compile_events):
    assert len(MALFORMED) >= 25
    # Positive control: the listener does see a compilation.
    before = len(compile_events)
    jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert len(compile_events) > before


@pytest.mark.parametrize("case,edits,field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_config_is_rejected_before_compilation(
    case, edits, field, corpus, tmp_path, compile_events
):
    d = _base(corpus, tmp_path / "run")
    for key, value in edits:
        _set(d, key, value)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    before = len(compile_events)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        stage = load_stage(path)
        resolve_stage(stage, num_devices=8)
    elapsed = time.perf_counter() - start
    assert err.value.field == field, f"{case}: {err.value}"
    assert elapsed < 5.0, f"{case} took {elapsed:.1f} s"
    assert len(compile_events) == before, f"{case} compiled something"
    assert not (tmp_path / "run").exists()


def test_cli_rejects_bad_config_under_python_O(corpus, tmp_path):
    d = _base(corpus, tmp_path / "run")
    d["trainable"] = ["vision_tower/.*"]
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(d))
    r = subprocess.run(
        [sys.executable, "-O", "-m", "longvila_jax.train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={
            "XLA_FLAGS": xla_flags(8),
            "JAX_PLATFORMS": "cpu",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trainable[0]" in r.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ real-size shapes


def test_stage5_traces_on_an_abstract_256_device_mesh():
    """The whole train step of the real stage-5 config at its real sizes, abstractly."""
    from jax.sharding import AbstractMesh, AxisType

    from longvila_jax.train.objective import DenseObjective
    from longvila_jax.train.optim import make_optimizer, make_schedule
    from longvila_jax.train.precision import DtypePolicy
    from longvila_jax.train.start import forward_template
    from longvila_jax.train.state import ModelTemplate, create_state, state_shardings
    from longvila_jax.train.step import make_train_step

    stage = load_stage(ROOT / "configs/stages/s5_long_sft_256f.yaml")
    r = resolve_stage(stage, num_devices=256, check_files=False)
    sizes = r.mesh_sizes
    assert sizes == {"data": 1, "fsdp": 1, "ring": 64, "ulysses": 4}
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * 4)
    template = ModelTemplate.build(r.model)
    n_params = sum(int(np.prod(s.shape)) for s in template.shapes.values())
    assert 7.5e9 < n_params < 8.5e9, n_params  # Qwen2-7B (7.6 B) + SigLIP-400M + projector
    opt = make_optimizer(stage.optim, stage.steps)
    policy = DtypePolicy.of(stage.precision, r.model)
    abstract = jax.eval_shape(
        lambda p: create_state(p, set(r.trainable_paths), opt, policy=policy),
        dict(template.shapes),
    )
    # As upstream's DeepSpeed bf16: bf16 weights on disk, fp32 masters and AdamW moments.
    assert r.model.param_dtype == "bfloat16"
    masters = jax.tree.leaves(abstract["params"]["trainable"])
    moments = [x for x in jax.tree.leaves(abstract["opt"]) if x.ndim > 0]
    assert masters and {x.dtype for x in masters} == {np.dtype(np.float32)}
    assert len(moments) == 2 * len(masters)
    assert {x.dtype for x in moments} == {np.dtype(np.float32)}
    shardings = state_shardings(abstract, template.shardings(mesh, r.mesh.param_rules), mesh, opt)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    objective = DenseObjective(r, mesh, image_token_id=r.model.image_token_id)
    accum, b, length = stage.optim.grad_accum, r.micro_batch, stage.seq_len
    frames = r.data.max_frames_per_row
    px = r.model.vision.image_size
    batch = {
        "text_ids": jax.ShapeDtypeStruct((accum, b, length), np.int32),
        "positions": jax.ShapeDtypeStruct((accum, b, length), np.int32),
        "segment_ids": jax.ShapeDtypeStruct((accum, b, length), np.int32),
        "labels": jax.ShapeDtypeStruct((accum, b, length), np.int32),
        "visual_index": jax.ShapeDtypeStruct((accum, b, length), np.int32),
        "frames": jax.ShapeDtypeStruct((accum, b, frames, px, px, 3), np.float32),
    }
    assert set(batch) == set(objective.shardings())
    forward = forward_template(r)
    assert forward.cfg.compute_dtype == "bfloat16"
    step = make_train_step(forward, objective, opt, make_schedule(stage.optim, stage.steps))
    new_state, metrics = jax.eval_shape(step, abstract, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(abstract)
    for a, b2 in zip(jax.tree.leaves(new_state), jax.tree.leaves(abstract), strict=True):
        assert a.shape == b2.shape and a.dtype == b2.dtype
    assert metrics["loss"].shape == ()
