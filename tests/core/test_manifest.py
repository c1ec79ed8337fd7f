"""Integrity manifests: any change to a listed file is caught, and a hostile manifest is a
problem string (the caller quarantines), never an exception or a read outside the tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import CheckpointError
from longvila_jax.core.manifest import MANIFEST_FILE, tree_files, verify_dir, write_manifest


@pytest.fixture
def tree(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    (d / "params" / "d").mkdir(parents=True)
    (d / "model.yaml").write_text("llm: {}\n")
    (d / "params" / "d" / "abc").write_bytes(bytes(range(256)) * 64)
    (d / "params" / "_METADATA").write_text("{}")
    write_manifest(d)
    return d


def _doc(d: Path) -> dict:
    return json.loads((d / MANIFEST_FILE).read_text())


def _write_doc(d: Path, doc) -> None:
    (d / MANIFEST_FILE).write_text(json.dumps(doc))


def test_clean_tree_verifies(tree):
    assert verify_dir(tree, None, required=("model.yaml",)) is None
    assert sorted(_doc(tree)["files"]) == ["model.yaml", "params/_METADATA", "params/d/abc"]


def test_flipped_byte_found(tree):
    f = tree / "params" / "d" / "abc"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    assert verify_dir(tree) == "params/d/abc: SHA-256 differs from the manifest"


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: (d / "model.yaml").unlink(), "model.yaml: missing"),
        (lambda d: (d / "extra.txt").write_text("x"), "extra.txt: not listed"),
        (
            lambda d: (d / "model.yaml").write_text("llm: {x: 1}\n"),
            "model.yaml: 12 bytes, the manifest recorded 8",
        ),
        (lambda d: (d / MANIFEST_FILE).unlink(), f"{MANIFEST_FILE}: missing"),
        (lambda d: (d / "link").symlink_to("/etc/hostname"), "link: a symlink"),
        (lambda d: os.mkfifo(d / "fifo"), "fifo: a special file"),
    ],
)
def test_damage_named(tree, damage, problem):
    damage(tree)
    assert verify_dir(tree).startswith(problem)


def test_required_files_and_step(tree):
    assert verify_dir(tree, None, required=("commit_success.txt",)) == (
        f"{MANIFEST_FILE}: does not list commit_success.txt"
    )
    assert "written for step None, not 3" in verify_dir(tree, 3)


HOSTILE = [
    ("[" * 5000 + "]" * 5000, "unreadable"),
    ('{"format": 1, "format": 2}', "unreadable"),
    ("NaN", "unreadable"),
    ("[]", "not a version-1"),
    ('{"format": "x"}', "not a version-1"),
]


@pytest.mark.parametrize("text, problem", HOSTILE)
def test_hostile_manifest_text_is_a_problem_not_an_exception(tree, text, problem):
    (tree / MANIFEST_FILE).write_text(text)
    assert problem in verify_dir(tree)


def test_manifest_paths_that_climb_out_are_refused(tree, tmp_path):
    doc = _doc(tree)
    doc["files"]["../../etc/hostname"] = {"size": 1, "sha256": "0" * 64}
    _write_doc(tree, doc)
    assert "not a path inside" in verify_dir(tree)


def test_manifest_with_wrong_types(tree):
    doc = _doc(tree)
    doc["files"]["model.yaml"]["size"] = True
    _write_doc(tree, doc)
    assert "not a version-1" in verify_dir(tree)


def test_fifo_manifest_does_not_hang(tree):
    (tree / MANIFEST_FILE).unlink()
    os.mkfifo(tree / MANIFEST_FILE)
    with time_limit(10):
        assert "FIFO" in verify_dir(tree)


def test_write_refuses_links(tree):
    (tree / "leak").symlink_to("/etc/hostname")
    with pytest.raises(CheckpointError, match="leak: a symlink"):
        write_manifest(tree)
    files, problem = tree_files(tree)
    assert "leak" not in files and problem.startswith("leak")
