"""Integrity of project checkpoints beyond the whole-directory check: partial verification
and sealing.

``orbax_io.verify_checkpoint`` hashes every file of a checkpoint against its manifest
(``core.manifest``). Two further operations live here:

- ``verify_files``: checks one sub-tree against the manifest (the tokenizer folder
  ``hf/llm``), so loading a tokenizer does not hash gigabytes of weights, while every file
  the tokenizer loader may open is still covered, and nothing unlisted can be slipped in.
- ``seal_checkpoint`` (``python -m longvila_jax.convert seal``): writes the manifest of a
  checkpoint written before manifests existed (or one the user vouches for), after checking
  its structure: no links or special files, ``model.yaml`` parses, ``provenance.json``
  validates, the HF files match the record, and the stored shapes match the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.checks import check_stored_params
from longvila_jax.ckpt.safetensors_io import SafetensorsFile
from longvila_jax.core.errors import CheckpointError, brief
from longvila_jax.core.manifest import MANIFEST_FILE, tree_files, verify_dir, write_manifest


def verify_files(ckpt: str | os.PathLike, prefix: str) -> None:
    """Checks the files under ``ckpt/prefix`` against the checkpoint's manifest.

    Every regular file there must be listed with its size and SHA-256, every listed file
    under ``prefix`` must be present, and no link or special file may appear.

    Raises:
      CheckpointError: naming the first bad file, a missing or invalid manifest, or a missing
        ``prefix`` folder.
    """
    ckpt = Path(ckpt)
    if not os.path.lexists(ckpt / prefix):
        raise CheckpointError(f"{ckpt}: has no {prefix}/ folder")
    problem = verify_dir(ckpt, None, under=prefix)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: integrity check failed: {problem}")


def check_hf_files(ckpt: Path, record: dict) -> None:
    """The ``hf/`` tree holds exactly the files ``provenance.hf_files`` lists, and each
    component's ``unused/`` file holds the tensors its record names (headers only)."""
    hf = ckpt / orbax_io.HF_DIR
    on_disk = tree_files(hf)[0] if hf.is_dir() else []
    listed = sorted(record["hf_files"])
    if on_disk != listed:
        diff = sorted(set(on_disk) ^ set(listed)) or listed
        raise CheckpointError(
            f"{ckpt}: {orbax_io.HF_DIR}/ holds {brief(on_disk)} but provenance.hf_files lists "
            f"{brief(listed)} (first difference: {brief(diff[0])})"
        )
    for comp, rec in record["components"].items():
        if rec["unused"]:
            path = ckpt / orbax_io.UNUSED_DIR / f"{comp}.safetensors"
            st = SafetensorsFile(path, ckpt)
            for name in rec["unused"]:
                st.info(name)  # raises naming the tensor if the file lacks it


def seal_checkpoint(ckpt: str | os.PathLike, *, force: bool = False) -> None:
    """Checks a project checkpoint's structure and writes its integrity manifest.

    Args:
      ckpt: a project checkpoint directory (``model.yaml`` + ``params/``).
      force: replace an existing manifest.

    Raises:
      CheckpointError: not a project checkpoint, a manifest exists (without ``force``), a
        link or special file, an invalid provenance, HF files that differ from the record,
        or stored shapes that disagree with ``model.yaml``.
      ConfigError: ``model.yaml`` is invalid.
    """
    ckpt = Path(ckpt)
    if os.path.islink(ckpt) or not orbax_io.is_project_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt}: not a project checkpoint (model.yaml + params/)")
    if os.path.lexists(ckpt / MANIFEST_FILE) and not force:
        raise CheckpointError(
            f"{ckpt}: already has {MANIFEST_FILE}; verify it instead, or pass --force to replace it"
        )
    _, problem = tree_files(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}")
    cfg = orbax_io.read_model_config(ckpt)
    record = orbax_io.read_provenance(ckpt)
    if "components" in record:
        check_hf_files(ckpt, record)
    check_stored_params(cfg, orbax_io.stored_tree(ckpt), ckpt)
    write_manifest(ckpt)


__all__ = ["check_hf_files", "seal_checkpoint", "verify_files"]
