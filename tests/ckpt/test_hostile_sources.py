"""Hostile source folders and configs: links to host files, FIFOs, mistyped JSON, bad --out.

- A symlink out of the source folder (to a canary file standing in for ``/etc/shadow``) is
  never copied into a checkpoint: an auxiliary file is skipped with a warning naming it, a file
  the importer or the tokenizer reads is refused by name. The Hugging Face hub cache layout,
  whose snapshot files all link into the repository's ``blobs/``, still imports.
- A FIFO named like a weight, config, index or tokenizer file is refused instead of hanging
  the import (each call runs with a deadline, so a regression fails instead of hanging).
- Mistyped config values end as ``ConfigError`` naming the field; unusable ``--out`` paths as
  ``error:`` lines from the CLI, never tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import vila_fixture as vf
from helpers.hostile import edit_json, no_hang, tree

from longvila_jax.ckpt import orbax_io
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.convert import main
from longvila_jax.core.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return vf.build_vila(tmp_path_factory.mktemp("sources") / "vila", vf.Spec(layers=1, v_layers=2))


@pytest.fixture
def src(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "src"))


@pytest.fixture
def canary(tmp_path) -> Path:
    path = tmp_path / "canary.json"  # outside src: stands in for /etc/shadow
    path.write_text('{"secret": "host file"}')
    return path


def _clean(src: Path, *also: str) -> None:
    assert sorted(p.name for p in src.parent.iterdir()) == sorted(["src", *also])


@pytest.mark.parametrize("rel", ["trainer_state.json", "vision_tower/preprocessor_config.json"])
def test_aux_link_to_a_host_file_is_skipped_and_reported(src, canary, rel, caplog):
    (src / rel).unlink()
    (src / rel).symlink_to(canary)
    out = src.parent / "out"
    with caplog.at_level("WARNING"):
        import_vila(src, out)
    assert rel in caplog.text and "skipping" in caplog.text
    assert not (out / "hf" / rel).exists()
    assert rel not in orbax_io.read_provenance(out)["hf_files"]
    assert not any(b"host file" in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "rel, error",
    [
        ("llm/tokenizer_config.json", CheckpointError),  # the tokenizer loader would read it
        ("mm_projector/model.safetensors", CheckpointError),
        ("mm_projector/config.json", ConfigError),
    ],
)
def test_read_files_linking_out_of_the_source_are_refused(src, canary, rel, error):
    if rel.endswith(".safetensors"):
        shutil.copy(src / rel, canary)
    (src / rel).unlink()
    (src / rel).symlink_to(canary)
    out = src.parent / "out"
    with pytest.raises(error, match="outside") as e:
        import_vila(src, out)
    assert rel.split("/")[1] in str(e.value)
    _clean(src, "canary.json")


def test_hugging_face_cache_layout_still_imports(good, tmp_path):
    """``models--org--name/snapshots/<rev>/x`` -> ``../../blobs/<sha>``, as the hub writes it."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    for i, path in enumerate(sorted(p for p in good.rglob("*") if p.is_file())):
        rel = path.relative_to(good)
        blob = repo / "blobs" / f"{i:064x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    import_vila(snap, tmp_path / "a")
    import_vila(good, tmp_path / "b")
    pa, pb = (orbax_io.read_provenance(tmp_path / c) for c in "ab")
    assert pa["hf_files"] == pb["hf_files"] and pa["components"] == pb["components"]


@pytest.mark.parametrize(
    "rel, match",
    [
        ("mm_projector/model.safetensors", "is a FIFO"),
        ("llm/config.json", "is a FIFO"),
        ("llm/model.safetensors.index.json", "is a FIFO"),
        ("llm/tokenizer.json", "not a regular file"),
        ("trainer_state.json", None),  # auxiliary: skipped, the import completes
    ],
)
def test_fifo_is_refused_not_waited_on(src, rel, match, caplog):
    fifo = src / rel
    fifo.unlink()
    os.mkfifo(fifo)
    out = src.parent / "out"
    with caplog.at_level("WARNING"):
        raised = no_hang(lambda: import_vila(src, out), [fifo])
    if match is None:
        assert raised is None and rel in caplog.text
        assert rel not in orbax_io.read_provenance(out)["hf_files"]
        return
    assert isinstance(raised, (CheckpointError, ConfigError)), raised
    assert match in str(raised) and rel.split("/")[-1] in str(raised)
    assert not out.exists()
    _clean(src)


def _set(path: str, value):
    """An edit of ``<src>/<file>`` setting the dotted key ``path`` (after the file name)."""
    fname, _, keys = path.partition(":")
    *head, last = keys.split(".")

    def fn(d):
        for k in head:
            d = d[k]
        d[last] = value

    return fname, fn


CONFIGS = {
    "rope_scaling a string": (_set("llm/config.json:rope_scaling", "linear"), "llm.rope_scaling"),
    "rope_theta text": (_set("llm/config.json:rope_theta", "abc"), "llm.rope_theta"),
    "rope_theta null": (_set("llm/config.json:rope_theta", None), "llm.rope_theta"),
    "rope_theta list": (_set("llm/config.json:rope_theta", [1.0]), "llm.rope_theta"),
    "rope_parameters a number": (_set("llm/config.json:rope_parameters", 3), "llm.rope_parameters"),
    "llm_cfg a list": (_set("config.json:llm_cfg", []), "llm_cfg"),
    "vision_config a list": (
        _set("vision_tower/config.json:vision_config", [1]),
        "vision.vision_config",
    ),
    "hidden_size text": (_set("llm/config.json:hidden_size", "64"), "llm.hidden_size"),
    "negative layers": (_set("llm/config.json:num_hidden_layers", -1), "llm.num_hidden_layers"),
    "boolean layers": (_set("llm/config.json:num_hidden_layers", True), "llm.num_hidden_layers"),
    "model_type a list": (_set("llm/config.json:model_type", ["qwen2"]), "llm.arch"),
    "vision size text": (_set("vision_tower/config.json:patch_size", "14"), "vision.patch_size"),
    "projector type missing": (
        _set("mm_projector/config.json:mm_projector_type", None),
        "projector.type",
    ),
    "select layer text": (_set("config.json:mm_vision_select_layer", "-2"), "vision.select_layer"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_mistyped_config_values_name_the_field(src, case):
    (fname, fn), field = CONFIGS[case]
    edit_json(src / fname, fn)
    out = src.parent / "out"
    with pytest.raises(ConfigError) as e:
        import_vila(src, out)
    assert e.value.field == field, str(e.value)
    assert not out.exists()
    _clean(src)


def test_deeply_nested_config_is_refused(src):
    text = (src / "llm" / "config.json").read_text()
    (src / "llm" / "config.json").write_text(
        text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    with pytest.raises(ConfigError, match="not valid JSON.*nested deeper") as e:
        import_vila(src, src.parent / "out")
    assert e.value.field == "llm/config.json" and len(str(e.value)) < 600
    _clean(src)


def test_cli_reports_unusable_out_paths(src, capsys):
    (src.parent / "a_file").write_text("x")
    cases = [
        (src.parent / "a_file" / "sub", "is a file"),
        (Path("/proc/no_such_dir/out"), "cannot create"),  # unwritable even for root
    ]
    if os.geteuid() != 0:  # root ignores permission bits
        (src.parent / "ro").mkdir(mode=0o500)
        cases.append((src.parent / "ro" / "out", "not writable"))
    for out, want in cases:
        assert main(["import", "--vila", str(src), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: output: cannot create") and want in err, err
        assert "Traceback" not in err and "File exists" not in err
    assert (src.parent / "a_file").read_text() == "x"
    _clean(src, "a_file", *(["ro"] if os.geteuid() != 0 else []))
    assert tree(src.parent / "ro") == [] if os.geteuid() != 0 else True


def test_cli_config_error_is_one_line(src, capsys):
    edit_json(src / "llm" / "config.json", lambda d: d.update(rope_theta="abc"))
    assert main(["import", "--vila", str(src), "--out", str(src.parent / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: llm.rope_theta:") and "Traceback" not in err
    assert json.loads((src / "llm" / "config.json").read_text())["rope_theta"] == "abc"
    _clean(src)
