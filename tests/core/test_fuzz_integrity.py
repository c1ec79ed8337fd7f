"""Fuzz: integrity manifests (``core.manifest.verify_dir``).

A small directory (``model.yaml``, ``provenance.json``, ``sub/weights.bin``) gets a valid
``integrity.sha256.json`` from ``write_manifest`` once, for a training step and for a model
checkpoint; each example replaces the manifest with a mutation of it (structured edits of
format/version/step/files/size/sha256 and of the listed paths: climbing out, absolute, NUL,
the manifest itself; byte-level edits; hostile documents). ``verify_dir`` must return None or
a bounded problem string and never raise; only the unmodified manifest may verify.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers.fuzz_mutations import FUZZ, Vocab, pick
from helpers.fuzz_outcome import MAX_MESSAGE_CHARS, time_limit
from helpers.fuzz_texts import json_inputs
from hypothesis import given
from hypothesis import strategies as st

from longvila_jax.core.manifest import MANIFEST_FILE, verify_dir, write_manifest

FILES = {"model.yaml": b"llm: {}\n", "provenance.json": b"{}", "sub/weights.bin": bytes(range(64))}
STEPS = (7, None)
VOCAB = Vocab(
    keys=(
        "format",
        "version",
        "step",
        "algorithm",
        "files",
        "size",
        "sha256",
        *FILES,
        MANIFEST_FILE,
    ),
    values=(*FILES, MANIFEST_FILE, "sub", "sub/weights.bin/x", "../model.yaml", "/etc/passwd")
    + ("sub/../model.yaml", "./model.yaml", "sub//weights.bin", "a\x00b", "sha256", 1, 7, 64)
    + ("0" * 64, {"size": 8, "sha256": "0" * 64}, {"size": True, "sha256": "x"}, 2**64),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return setup(tmp_path_factory.mktemp("fuzz_integrity"))


def make_dir(root: Path, step: int | None) -> dict:
    """Writes the small directory and its manifest; returns the manifest document."""
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    write_manifest(root, step)
    assert verify_dir(root, step) is None
    doc = json.loads((root / MANIFEST_FILE).read_text())
    assert doc == _doc(step)
    return doc


def setup(root: Path) -> Path:
    for step in STEPS:
        make_dir(root / f"step_{step}", step)
    return root


@st.composite
def manifest_cases(draw) -> tuple[int | None, bytes]:
    step = pick(draw, STEPS)
    return step, draw(json_inputs(DOCS[step], VOCAB))


def _doc(step: int | None) -> dict:
    """The manifest ``write_manifest`` writes for ``FILES`` (built here, no disk needed)."""
    files = {r: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for r, d in FILES.items()}
    return {
        "algorithm": "sha256",
        "files": files,
        "format": "longvila-jax checkpoint integrity manifest",
        "step": step,
        "version": 1,
    }


DOCS = {step: _doc(step) for step in STEPS}


def check_manifest(root: Path, case: tuple[int | None, bytes]) -> None:
    step, text = case
    folder = root / f"step_{step}"
    (folder / MANIFEST_FILE).write_bytes(text)
    with time_limit():
        problem = verify_dir(folder, step, required=("model.yaml",))
    if problem is None:  # verified: it must record the real files (extra keys are ignored)
        doc, want = json.loads(text), DOCS[step]
        assert doc.get("step") == step and doc["files"].keys() == want["files"].keys()
        for rel, entry in want["files"].items():
            got = doc["files"][rel]
            assert (got["size"], got["sha256"]) == (entry["size"], entry["sha256"]), rel
        return
    assert isinstance(problem, str) and problem.strip()
    assert len(problem) <= MAX_MESSAGE_CHARS, f"unbounded problem ({len(problem)} chars)"


@FUZZ
@given(case=manifest_cases())
def test_integrity_manifest_mutations(workdir, case):
    check_manifest(workdir, case)
