"""The engine's journals (``longvideo.store``): what a crash leaves is resumed, damage is
refused with the file and line, and changed settings never mix with old results."""

from __future__ import annotations

import json

import pytest

from longvila_jax.core.errors import InputError
from longvila_jax.longvideo.store import Journal, check_run_settings


def test_journal_resumes_and_drops_the_line_in_flight(tmp_path):
    path = tmp_path / "work" / "caption.jsonl"
    j = Journal(path)
    j.add({"key": "a#0", "caption": "red"})
    j.add({"key": "a#1", "caption": "blue"})
    with open(path, "ab") as f:  # a crash in the middle of the third record
        f.write(b'{"key": "a#2", "capt')
    again = Journal(path)
    assert sorted(again.records) == ["a#0", "a#1"]
    assert again.get("a#1")["caption"] == "blue"
    assert path.read_bytes().endswith(b"}\n")  # truncated back to the last whole line
    again.add({"key": "a#2", "caption": "green"})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a#0", "a#1", "a#2"]
    with pytest.raises(ValueError, match="string key"):
        again.add({"caption": "no key"})


@pytest.mark.parametrize(
    "line, match",
    [(b"not json\n", "line 2"), (b"[1]\n", "line 2 is not a record"), (b'{"key": 3}\n', "line 2")],
)
def test_damaged_journal_is_refused_with_its_line(tmp_path, line, match):
    path = tmp_path / "probe.jsonl"
    path.write_bytes(b'{"key": "v.mp4", "status": "ok"}\n' + line)
    with pytest.raises(InputError, match=match):
        Journal(path)


def test_journal_refuses_a_link(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text('{"key": "x"}\n')
    (tmp_path / "probe.jsonl").symlink_to(target)
    with pytest.raises(InputError, match="regular file"):
        Journal(tmp_path / "probe.jsonl")


def test_changed_settings_stop_the_run_unless_restarted(tmp_path):
    work = tmp_path / "work"
    first = {"probe": {"clip_s": 10}, "caption": {"backend": "oracle"}, "write": {"v": 1}}
    check_run_settings(work, first)
    for stage in ("probe", "caption", "write"):
        (work / f"{stage}.jsonl").write_text('{"key": "x"}\n')
    check_run_settings(work, first)  # same settings: fine, nothing deleted
    assert (work / "write.jsonl").exists()
    new_writer = {**first, "write": {"v": 2}}
    with pytest.raises(InputError, match="write stage .* --restart-from write"):
        check_run_settings(work, new_writer)
    check_run_settings(work, new_writer, restart_from="write")
    assert not (work / "write.jsonl").exists() and (work / "caption.jsonl").exists()
    new_captioner = {**new_writer, "caption": {"backend": "local:/m"}}
    with pytest.raises(InputError, match="caption stage .*backend"):
        check_run_settings(work, new_captioner)
    check_run_settings(work, new_captioner, restart_from="caption")
    assert not (work / "caption.jsonl").exists() and (work / "probe.jsonl").exists()
    assert json.loads((work / "run.json").read_text()) == new_captioner
