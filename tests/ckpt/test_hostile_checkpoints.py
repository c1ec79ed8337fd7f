"""Hostile project checkpoints: every attack ends in a named error and writes nothing.

One tiny VILA checkpoint is imported once; each case copies the project checkpoint, tampers
with one thing and, where an attacker would ship a matching manifest, reseals it so that the
checks behind the manifest are what must refuse it. Besides the error type and the field or
tensor in the message, each case checks that nothing was written next to the output or in the
"outside" folder standing in for site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import vila_fixture as vf
from helpers.hostile import cli, edit_json, reseal, tree

from longvila_jax.ckpt import orbax_io, provenance
from longvila_jax.ckpt.integrity import seal_checkpoint
from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
from longvila_jax.ckpt.safetensors_writer import PlanWriter
from longvila_jax.ckpt.vila_export import export_vila
from longvila_jax.ckpt.vila_import import import_vila
from longvila_jax.convert import main
from longvila_jax.core.errors import CheckpointError, ConfigError
from longvila_jax.core.manifest import MANIFEST_FILE

LLM = "components.llm"
# From <tmp>/work/.out.tmp-xxxx/llm/ three levels up is <tmp>: lands in <tmp>/site/.
EVIL = "../../../site/evil.pth"
# An absolute name lands in <tmp>/site/ too (tests run from the checkpoint's own tmp_path).
ABSOLUTE = "ABSOLUTE"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_ckpt")
    src = vf.build_vila(root / "vila", vf.Spec(layers=1, v_layers=2))
    import_vila(src, root / "ckpt")
    return root / "ckpt"


@pytest.fixture
def ckpt(base, tmp_path) -> Path:
    (tmp_path / "site").mkdir()  # stands in for site-packages: must stay empty
    (tmp_path / "work").mkdir()
    return Path(shutil.copytree(base, tmp_path / "work" / "ckpt"))


def _untouched(ckpt: Path) -> None:
    """Nothing beside the checkpoint, nothing in the outside folder."""
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]
    assert tree(ckpt.parent.parent / "site") == []


def _tamper(ckpt: Path, fn) -> None:
    path = ckpt / orbax_io.PROVENANCE
    edit_json(path, fn)
    # ABSOLUTE stands for this test's own outside folder, so a regression writes nowhere else.
    site = json.dumps(str(ckpt.parent.parent / "site" / "evil.safetensors"))
    path.write_text(path.read_text().replace('"ABSOLUTE"', site))
    reseal(ckpt)


def _llm(d: dict) -> dict:
    return d["components"]["llm"]


def _remap_index(d: dict) -> None:
    index = json.loads(_llm(d)["index_text"])
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = EVIL
    _llm(d)["index_text"] = json.dumps(index)


ATTACKS = {
    "shard name": (lambda d: _llm(d)["plan"]["files"][0].update(name=EVIL), "plan.files[0].name"),
    "absolute shard": (
        lambda d: _llm(d)["plan"]["files"][0].update(name=ABSOLUTE),
        "plan.files[0].name",
    ),
    "shard suffix": (
        lambda d: _llm(d)["plan"]["files"][0].update(name="evil.pth"),
        "plan.files[0].name",
    ),
    "index name": (lambda d: _llm(d)["plan"].update(index=EVIL), "plan.index"),
    "index text": (_remap_index, "index_text.weight_map"),
    "hf file": (lambda d: d["hf_files"].append("../site/evil.pth"), "provenance.hf_files[9]"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_export_refuses_names_from_provenance(ckpt, case):
    fn, field = ATTACKS[case]
    _tamper(ckpt, fn)
    out = ckpt.parent / "out"
    with pytest.raises(CheckpointError, match="provenance") as e:
        export_vila(ckpt, out)
    assert field in str(e.value) and "provenance.json" in str(e.value)
    assert not out.exists()
    _untouched(ckpt)


def test_cli_export_of_a_pth_dropping_checkpoint_fails_cleanly(ckpt):
    _tamper(ckpt, ATTACKS["shard name"][0])
    r = cli("export", "--ckpt", ckpt, "--out", ckpt.parent / "out")
    assert r.returncode == 1, r.stderr
    assert "error:" in r.stderr and "plan.files[0].name" in r.stderr
    assert "Traceback" not in r.stderr
    _untouched(ckpt)


def test_trainer_save_refuses_a_tampered_init(ckpt, tmp_path):
    _tamper(ckpt, ATTACKS["index name"][0])
    cfg = orbax_io.read_model_config(ckpt)
    with pytest.raises(CheckpointError, match=r"llm\.plan\.index"):
        orbax_io.save_checkpoint(tmp_path / "work" / "final", cfg, {}, like=ckpt)
    _untouched(ckpt)


def test_writers_refuse_non_plain_names_themselves(tmp_path):
    outside = tmp_path / "site"
    outside.mkdir()
    d = tmp_path / "out"
    d.mkdir()
    (d / "taken.safetensors").write_bytes(b"keep")
    file = {"metadata": {}, "tensors": [["w", "F32", [1]]]}
    for name in ("../site/x.safetensors", f"{outside}/x.safetensors", "a/b.safetensors", ".x"):
        with pytest.raises(CheckpointError, match="not a plain file name"):
            PlanWriter(d, {"index": None, "files": [{**file, "name": name}]})
    with pytest.raises(CheckpointError, match="not a plain file name"):
        PlanWriter(d, {"index": "../site/i.json", "files": [{**file, "name": "a.safetensors"}]})
    with pytest.raises(CheckpointError, match="already exists"):
        PlanWriter(d, {"index": None, "files": [{**file, "name": "taken.safetensors"}]})
    assert tree(d) == ["taken.safetensors"] and (d / "taken.safetensors").read_bytes() == b"keep"
    assert tree(outside) == []


FIELDS = {
    "duplicate key": (None, "duplicate key"),
    "unused not a list": (lambda d: _llm(d).update(unused="x"), f"{LLM}.unused"),
    "unknown dtype": (
        lambda d: _llm(d)["plan"]["files"][0]["tensors"][0].__setitem__(1, "Q8"),
        f"{LLM}.plan.files[0].tensors[0][1]",
    ),
    "prefix not bool": (lambda d: _llm(d).update(siglip_prefix="yes"), f"{LLM}.siglip_prefix"),
    "component missing": (
        lambda d: d["components"].pop("mm_projector"),
        "components.mm_projector",
    ),
    "source a list": (lambda d: d.update(source=[]), "provenance.source"),
    "index lacks tensor": (
        lambda d: _llm(d).update(
            index_text=json.dumps(
                {
                    "weight_map": dict(
                        list(json.loads(_llm(d)["index_text"])["weight_map"].items())[1:]
                    )
                }
            )
        ),
        f"{LLM}.index_text.weight_map",
    ),
}


@pytest.mark.parametrize("case", sorted(FIELDS))
def test_provenance_is_validated_when_read(ckpt, case):
    fn, field = FIELDS[case]
    path = ckpt / orbax_io.PROVENANCE
    if fn is None:  # json.loads would keep the last "format" silently
        path.write_text(path.read_text().replace("{", '{"format": "other",', 1))
    else:
        edit_json(path, fn)
    with pytest.raises(CheckpointError) as e:
        orbax_io.read_provenance(ckpt)
    assert field in str(e.value) and "provenance.json" in str(e.value)


def test_minimal_records_validate():
    assert provenance.validate({"format": provenance.FORMAT, "source": {"layout": "random"}})


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_params_is_refused_by_every_reader(ckpt):
    data = max(
        (p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    _flip_byte(data)
    rel = str(data.relative_to(ckpt))
    readers = [
        lambda: load_pretrained(ckpt),
        lambda: orbax_io.load_checkpoint(ckpt),
        lambda: orbax_io.load_params(ckpt),
        lambda: export_vila(ckpt, ckpt.parent / "out"),
    ]
    for read in readers:
        with pytest.raises(CheckpointError, match="integrity check failed") as e:
            read()
        assert rel in str(e.value)
    load_tokenizer(ckpt)  # the tokenizer files are intact: only they are verified for it
    _flip_byte(ckpt / "hf" / "llm" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="hf/llm/tokenizer.json: SHA-256"):
        load_tokenizer(ckpt)
    _untouched(ckpt)


def _grow_intermediate(ckpt: Path) -> None:
    path = ckpt / orbax_io.MODEL_YAML
    text = path.read_text()
    assert "intermediate_size: 96" in text
    path.write_text(text.replace("intermediate_size: 96", "intermediate_size: 128"))


def test_config_that_disagrees_with_stored_shapes(ckpt):
    _grow_intermediate(ckpt)
    reseal(ckpt)
    for read in (
        lambda: load_pretrained(ckpt),
        lambda: orbax_io.load_checkpoint(ckpt),
        lambda: export_vila(ckpt, ckpt.parent / "out"),
    ):
        with pytest.raises(CheckpointError, match=r"parameter llm/\S+ is stored with shape") as e:
            read()
        assert "96" in str(e.value) and "128" in str(e.value)
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.yaml implies"):
        seal_checkpoint(ckpt)
    assert not (ckpt / MANIFEST_FILE).exists()
    _untouched(ckpt)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_bomb_model_yaml_is_refused_quickly(ckpt, capsys):
    assert len(BOMB) < 1024
    (ckpt / orbax_io.MODEL_YAML).write_text(BOMB)
    reseal(ckpt)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb") as e:
        load_pretrained(ckpt)
    assert len(str(e.value)) < 600
    assert main(["export", "--ckpt", str(ckpt), "--out", str(ckpt.parent / "out")]) == 1
    err = capsys.readouterr().err
    assert "alias bomb" in err and len(err) < 800 and "Traceback" not in err
    assert time.perf_counter() - start < 10
    _untouched(ckpt)


def test_seal_an_old_checkpoint(ckpt, capsys):
    (ckpt / MANIFEST_FILE).unlink()  # written before manifests existed
    with pytest.raises(CheckpointError, match="convert seal"):
        load_pretrained(ckpt)
    assert main(["seal", "--ckpt", str(ckpt)]) == 0
    orbax_io.verify_checkpoint(ckpt)
    assert main(["seal", "--ckpt", str(ckpt)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["seal", "--ckpt", str(ckpt), "--force"]) == 0
    orbax_io.verify_checkpoint(ckpt)
    _untouched(ckpt)


@pytest.mark.parametrize("case", ["host link", "fifo", "extra hf file", "bad provenance"])
def test_seal_refuses_an_unsound_checkpoint(ckpt, case, capsys):
    (ckpt / MANIFEST_FILE).unlink()
    canary = ckpt.parent.parent / "site" / "canary"
    if case == "host link":
        canary.write_text("host secret")
        (ckpt / "hf" / "llm" / "special_tokens_map.json").symlink_to(canary)
        want = "special_tokens_map.json: a symlink"
    elif case == "fifo":
        os.mkfifo(ckpt / "unused" / "extra.safetensors")
        want = "extra.safetensors: a special file"
    elif case == "extra hf file":
        (ckpt / "hf" / "notes.txt").write_text("x")
        want = "notes.txt"
    else:
        edit_json(ckpt / orbax_io.PROVENANCE, ATTACKS["hf file"][0])
        want = "provenance.hf_files[9]"
    assert main(["seal", "--ckpt", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert not (ckpt / MANIFEST_FILE).exists()
    if case == "host link":
        canary.unlink()
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]


def test_nonfinite_params_in_a_project_checkpoint(ckpt, caplog):
    cfg = orbax_io.read_model_config(ckpt)
    params = orbax_io.load_params(ckpt)
    params["llm"]["norm"]["scale"] = params["llm"]["norm"]["scale"].at[0].set(np.nan)
    bad = ckpt.parent / "nan"
    orbax_io.save_checkpoint(bad, cfg, params, like=ckpt)
    with pytest.raises(CheckpointError, match="parameter llm/norm/scale: holds NaN or Inf"):
        load_pretrained(bad)
    with caplog.at_level("WARNING"):
        load_pretrained(bad, allow_nonfinite=True)
    assert "llm/norm/scale" in caplog.text
