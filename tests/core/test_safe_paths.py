"""Path safety: names from files stay inside the output, links and FIFOs never leak or hang.

Every case is an attack on the helper every writer and reader uses: a name that climbs out
(``../x.pth``), a symlinked sub-folder that redirects a write, a symlink to a host file, a FIFO
where a file should be. Hub-cache links (``snapshots/<rev>/f -> ../../blobs/<sha>``) must
still be followed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import CheckpointError, ConfigError
from longvila_jax.core.safe_paths import (
    check_member,
    check_name,
    check_relpath,
    copy_file,
    copy_tree,
    is_regular,
    join_inside,
    open_regular,
    prepare_parent,
    read_regular,
    target_allowed,
    write_atomic,
)

GOOD_NAMES = [
    "model.safetensors",
    "model-00001-of-00004.safetensors",
    "model.safetensors.index.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]
BAD_NAMES = [
    "",
    ".",
    "..",
    "../evil.pth",
    "a/b",
    "/etc/passwd",
    ".hidden",
    "-rf",
    "a\\b",
    "nul\x00byte",
    "x" * 300,
    "a..b",
    "tab\tname",
    None,
    7,
    ["model.safetensors"],
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_names_accepted(name):
    assert check_name(name, "f") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_refused_naming_the_field(name):
    with pytest.raises(CheckpointError, match=r"^provenance\.x: ") as e:
        check_name(name, "provenance.x")
    assert len(str(e.value)) < 300


def test_relpaths_and_members():
    assert check_relpath("llm/tokenizer.json", "f") == "llm/tokenizer.json"
    for bad in ("llm/../../x", "/abs", "a//b", "a/b/c/d/e", "llm/.git"):
        with pytest.raises(CheckpointError):
            check_relpath(bad, "f")
    assert check_member("state/_METADATA", "m") == "state/_METADATA"
    for bad in ("../x", "a/../b", "", "/abs", "a//b", "a\x00"):
        with pytest.raises(CheckpointError):
            check_member(bad, "m")
    with pytest.raises(ConfigError) as e:
        check_name("../x", "data.file", ConfigError)
    assert e.value.field == "data.file"


def test_join_inside_refuses_a_symlinked_subfolder(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    assert join_inside(root, "llm/model.safetensors", "f") == root / "llm/model.safetensors"
    (root / "llm").symlink_to(outside)
    with pytest.raises(CheckpointError, match="resolves outside"):
        join_inside(root, "llm/model.safetensors", "f")
    with pytest.raises(CheckpointError):
        join_inside(root, "../elsewhere/x", "f")


def _call(fn, seconds: float = 10):
    """``fn()``'s result or the exception it raised; a block over ``seconds`` fails the test."""
    with time_limit(seconds):
        try:
            return fn()
        except CheckpointError as e:
            return e


def test_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    err = _call(lambda: open_regular(fifo, "weights"))
    assert isinstance(err, CheckpointError) and "FIFO" in str(err)
    err = _call(lambda: read_regular(fifo, "weights", max_bytes=10))
    assert isinstance(err, CheckpointError)
    assert not is_regular(fifo, tmp_path)
    err = _call(lambda: copy_file(fifo, tmp_path / "copy", "aux"))
    assert isinstance(err, CheckpointError) and not (tmp_path / "copy").exists()


def test_directory_and_missing_refused(tmp_path):
    with pytest.raises(CheckpointError, match="a directory"):
        open_regular(tmp_path, "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_regular(tmp_path / "nope", "x")


def test_symlink_out_of_the_tree_is_not_read_or_copied(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret")
    src = tmp_path / "download"
    src.mkdir()
    (src / "tokenizer_config.json").symlink_to(secret)
    (src / "inside.json").write_text("{}")
    (src / "alias.json").symlink_to(src / "inside.json")
    link = src / "tokenizer_config.json"
    assert not target_allowed(link, src)
    assert not is_regular(link, src)
    assert is_regular(src / "alias.json", src)  # a link that stays inside the tree is fine
    with pytest.raises(CheckpointError, match="outside"):
        read_regular(link, "aux", root=src)
    with pytest.raises(CheckpointError, match="outside"):
        copy_file(link, tmp_path / "copied", "aux", root=src)
    assert not (tmp_path / "copied").exists()


def test_hub_cache_links_are_followed(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "deadbeef").write_text('{"model_type": "qwen2"}')
    (snap / "config.json").symlink_to("../../blobs/deadbeef")
    assert target_allowed(snap / "config.json", snap)
    assert is_regular(snap / "config.json", snap)
    assert read_regular(snap / "config.json", "cfg", root=snap) == b'{"model_type": "qwen2"}'
    # ... but not a link from the snapshot to anywhere else in the cache or the host.
    (tmp_path / "host").write_text("secret")
    (snap / "evil.json").symlink_to(tmp_path / "host")
    assert not is_regular(snap / "evil.json", snap)


def test_copy_tree_refuses_links_and_copies_regular_files(tmp_path):
    src = tmp_path / "hf"
    (src / "llm").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "llm" / "tokenizer.json").write_text("{}")
    assert copy_tree(src, tmp_path / "a", "hf") == ["config.json", "llm/tokenizer.json"]
    (src / "llm" / "leak.json").symlink_to(tmp_path / "a" / "config.json")
    with pytest.raises(CheckpointError, match="hf/llm/leak.json: .* is a symlink"):
        copy_tree(src, tmp_path / "b", "hf")


def test_copy_file_never_overwrites_or_writes_through_a_link(tmp_path):
    (tmp_path / "src").write_text("new")
    (tmp_path / "victim").write_text("keep")
    (tmp_path / "dst").symlink_to(tmp_path / "victim")
    with pytest.raises(CheckpointError, match="cannot create"):
        copy_file(tmp_path / "src", tmp_path / "dst", "aux")
    assert (tmp_path / "victim").read_text() == "keep"


def test_prepare_parent_messages(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        prepare_parent(tmp_path / "file" / "sub" / "out", "--out")
    with pytest.raises(CheckpointError, match="is a file"):
        prepare_parent(tmp_path / "file" / "out", "--out")
    prepare_parent(tmp_path / "new" / "deeper" / "out", "--out")
    assert (tmp_path / "new" / "deeper").is_dir()


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "provenance.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json"]


def test_unsafe_name_is_never_created(tmp_path):
    # The export attack in miniature: a planned name that climbs out of the output.
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError):
        join_inside(out, "../../site-packages/evil.pth", "provenance.files[0].name")
    assert sorted(Path(tmp_path).rglob("*.pth")) == []
