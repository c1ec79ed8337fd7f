"""Checkpoint integrity (reliability scenario 12) at the checkpoint-manager level.

A :class:`Checkpointer` saves small sharded pytrees (float32 on 8 devices, bfloat16, int32, the
uint32 RNG) with an iterator state and meta. The newest step is then damaged on disk in one of
several ways: a flipped byte or a truncation in an array data file, a deleted commit marker or
manifest, a corrupt JSON file, a corrupt manifest. A fresh Checkpointer (as a restarted run)
must skip that step, warn with the step and the bad file, move it aside, and restore the
previous step bit for bit. All steps corrupt must raise, and retention after a fallback must
keep the good step until a newer one is committed. The end-to-end trainer run with a corrupt
newest step is part of the random-offset kill chain in ``test_resume_offsets.py``; the kill
switch's parsing of ``$LONGVILA_TEST_KILL`` (through ``core.faults``) is checked here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.harness import array_file, flip_array_byte
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longvila_jax.config.train import CheckpointConfig
from longvila_jax.core.faults import KILL_ENV
from longvila_jax.train.checkpoint import CORRUPT_DIR, Checkpointer, CorruptCheckpoints
from longvila_jax.train.integrity import COMMIT_FILE, MANIFEST_FILE, verify_step_dir
from longvila_jax.train.kill_switch import KillSwitch


class _Iter:
    """The part of the data iterator the Checkpointer uses."""

    def __init__(self, pos: int = 0):
        self.pos = pos

    def get_state(self) -> dict:
        return {"pos": self.pos, "epoch": self.pos // 3}

    def set_state(self, state: dict) -> None:
        self.pos = state["pos"]


def _sharding():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    return NamedSharding(mesh, PartitionSpec("fsdp", None))


def _state(step: int) -> dict:
    """A distinct state per step: random float32 (sharded), bfloat16, int32 and uint32 leaves."""
    key = jax.random.fold_in(jax.random.key(0), step)
    k1, k2 = jax.random.split(key)
    w = jax.device_put(jax.random.normal(k1, (64, 48), jnp.float32), _sharding())
    return {
        "params": {"w": w, "b": jax.random.normal(k2, (48,), jnp.bfloat16)},
        "count": jnp.int32(step),
        "rng": jax.random.key_data(key).astype(jnp.uint32),
    }


def _abstract() -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0)
    )


def _bits(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(v).tobytes()
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _save_steps(directory: Path, steps, keep: int = 2, async_save: bool = True) -> None:
    ck = Checkpointer(directory, CheckpointConfig(every=1, keep=keep, async_save=async_save))
    try:
        for s in steps:
            ck.save(s, _state(s), _Iter(10 * s), {"step": s})
        ck.wait()
    finally:
        ck.close()


def _truncate(step_dir: Path) -> str:
    f = array_file(step_dir)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f.relative_to(step_dir).as_posix()


def _delete(name: str):
    def run(step_dir: Path) -> str:
        (step_dir / name).unlink()
        return name

    return run


def _corrupt_json(name: str):
    def run(step_dir: Path) -> str:
        f = step_dir / name
        text = f.read_text()
        f.write_text(text[:-2] + "#" + text[-1:])  # same size, no longer the same JSON
        return name

    return run


def _hostile_manifest(text: str):
    """Replaces the manifest with hostile JSON (it used to raise RecursionError on resume)."""

    def run(step_dir: Path) -> str:
        (step_dir / MANIFEST_FILE).write_text(text)
        return MANIFEST_FILE

    return run


CORRUPTIONS = {
    "flip_array_byte": flip_array_byte,
    "truncate_array": _truncate,
    "delete_commit_marker": _delete(COMMIT_FILE),
    "delete_manifest": _delete(MANIFEST_FILE),
    "corrupt_meta_json": _corrupt_json("meta/metadata"),
    "corrupt_iter_state_json": _corrupt_json("data_iter/process_0-of-1.json"),
    "corrupt_array_metadata_json": _corrupt_json("state/_METADATA"),
    "corrupt_manifest_json": _corrupt_json(MANIFEST_FILE),
    "nested_manifest": _hostile_manifest("[" * 100_000 + "]" * 100_000),
    "manifest_duplicate_keys": _hostile_manifest('{"files": {}, "files": {}}'),
}


def test_committed_steps_carry_a_verifying_manifest(tmp_path):
    for async_save in (True, False):
        d = tmp_path / f"async_{async_save}"
        _save_steps(d, [1, 2], async_save=async_save)
        for s in (1, 2):
            assert (d / str(s) / MANIFEST_FILE).is_file()
            assert verify_step_dir(d / str(s), s) is None
        # The manifest lists every file of the step, the commit marker included.
        assert verify_step_dir(d / "2", 1) is not None  # recorded for step 2, not 1
        (d / "2" / "state" / "stray").write_text("x")
        assert verify_step_dir(d / "2", 2) == f"state/stray: not listed in {MANIFEST_FILE}"


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_step_falls_back_bit_exactly(tmp_path, caplog, kind):
    d = tmp_path / "ck"
    _save_steps(d, [1, 2, 3])  # keep=2: steps 2 and 3 remain
    bad_file = CORRUPTIONS[kind](d / "3")
    assert verify_step_dir(d / "3", 3) is not None

    ck = Checkpointer(d, CheckpointConfig(every=1, keep=2))
    try:
        with caplog.at_level(logging.WARNING, logger="longvila_jax.train.checkpoint"):
            step = ck.restorable_step()
        assert step == 2
        # The warning names the step and its first bad file.
        ((rejected_step, problem),) = ck.rejected
        assert rejected_step == 3
        assert problem.startswith(f"{bad_file}:"), problem
        assert any(
            "step 3" in r.getMessage() and bad_file in r.getMessage() for r in caplog.records
        )
        # Moved aside, not deleted, and invisible to Orbax.
        assert (d / CORRUPT_DIR / "3").is_dir() and not (d / "3").exists()
        assert ck.manager.all_steps() == [2]

        it = _Iter()
        state, meta = ck.restore(step, _abstract(), it)
        assert _bits(state) == _bits(_state(2))
        assert state["params"]["w"].sharding == _sharding()
        assert meta == {"step": 2}
        assert it.pos == 20
    finally:
        ck.close()


def test_all_corrupt_raises_naming_every_step(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [1, 2])
    flip_array_byte(d / "2")
    (d / "1" / COMMIT_FILE).unlink()
    ck = Checkpointer(d, CheckpointConfig(every=1, keep=2))
    try:
        with pytest.raises(CorruptCheckpoints, match=r"step 2: state/.*SHA-256.*step 1: commit"):
            ck.restorable_step()
        # Nothing is moved or deleted when there is nothing good to fall back to.
        assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["1", "2"]
        assert not (d / CORRUPT_DIR).exists()
        # restore() refuses an unverified corrupt step too.
        with pytest.raises(CorruptCheckpoints, match="step 2 is corrupt"):
            ck.restore(2, _abstract(), _Iter())
    finally:
        ck.close()


def test_no_checkpoints_is_a_fresh_run(tmp_path):
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(every=1, keep=2))
    try:
        assert ck.restorable_step() is None
        assert ck.rejected == []
    finally:
        ck.close()


def _fallback_to_2(d: Path) -> Checkpointer:
    _save_steps(d, [2, 3])
    _truncate(d / "3")
    ck = Checkpointer(d, CheckpointConfig(every=1, keep=2))
    assert ck.restorable_step() == 2
    return ck


def _save(ck: Checkpointer, step: int) -> list[int]:
    ck.save(step, _state(step), _Iter(10 * step), {"step": step})
    ck.wait()
    return ck.manager.all_steps()


def test_retention_after_fallback_keeps_the_last_good_step(tmp_path):
    # The resumed run rewrites the corrupt step's number, then moves on: keep=2 deletes the
    # good step 2 only once two newer steps are committed.
    ck = _fallback_to_2(tmp_path / "a")
    try:
        assert _save(ck, 3) == [2, 3]
        assert _save(ck, 4) == [3, 4]
        assert all(verify_step_dir(tmp_path / "a" / str(s), s) is None for s in (3, 4))
        assert (tmp_path / "a" / CORRUPT_DIR / "3").is_dir()
    finally:
        ck.close()
    # The resumed run saves past the corrupt step's number (as after a change of
    # `checkpoint.every`). Had the corrupt step 3 stayed listed, keep=2 would now keep {3, 4}
    # and delete step 2, the only good one.
    ck = _fallback_to_2(tmp_path / "b")
    try:
        assert _save(ck, 4) == [2, 4]
    finally:
        ck.close()
    ck = Checkpointer(tmp_path / "b", CheckpointConfig(every=1, keep=2))
    try:
        assert ck.restorable_step() == 4
        state, _ = ck.restore(4, _abstract(), _Iter())
        assert _bits(state) == _bits(_state(4))
    finally:
        ck.close()


@pytest.mark.parametrize(
    ("spec", "site", "step", "offset"),
    [
        ("", None, -1, None),
        ("mid_write@3", "mid_write", 3, None),
        ("offset=0.25@4", "offset", 4, 0.25),
        ("dir_commit@2", "dir_commit", 2, None),  # a core.faults site: left to faults.hit
        ("final_offset=0.5@8", "final_offset=0.5", 8, None),  # train.finish.arm_kill's
    ],
)
def test_kill_switch_parses_the_env_through_faults(monkeypatch, spec, site, step, offset):
    monkeypatch.setenv(KILL_ENV, spec)
    kill = KillSwitch.from_env()
    assert (kill.site, kill.step, kill.offset) == (site, step, offset)
    kill.at("after_step", 1)  # not armed there: returns
    kill.watch_save(Path("/nonexistent"), 99)  # nor there


@pytest.mark.parametrize("spec", ["mid_write", "mid_write@x", "offset=soon@2"])
def test_kill_switch_refuses_a_malformed_spec(monkeypatch, spec):
    monkeypatch.setenv(KILL_ENV, spec)
    with pytest.raises(ValueError):
        KillSwitch.from_env()
