"""Hostile evaluation inputs: VideoMME annotations and V-NIAH needle folders are read with the
checked loader and path helpers, so a bad file is an ``InputError`` naming the file and line,
never a traceback, a hang on a FIFO or a read outside the folder."""

from __future__ import annotations

import json
import os

import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import InputError
from longvila_jax.eval.needles import load_needles, make_needles, numbers_from_manifest
from longvila_jax.eval.needles import write_needles as write_needle_dir
from longvila_jax.eval.videomme_annotations import MCQuestion, find_video, load_annotations

ROW = {
    "video_id": "001",
    "duration": "short",
    "videoID": "fFjv93ACGo8",
    "question_id": "001-1",
    "question": "Which?",
    "options": ["A. x", "B. y"],
    "answer": "A",
}


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 50_000 + "]" * 50_000, "nested deeper"),
        ('[{"video_id": "1", "video_id": "2"}]', "duplicate key"),
        ("[NaN]", "non-standard"),
        (json.dumps([{**ROW, "options": "A. x"}]), "field 'options' must be list"),
        (json.dumps([{**ROW, "answer": "x" * 100_000}]), "is not one of the option letters"),
    ],
)
def test_bad_annotation_json(tmp_path, text, match):
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as e:
        load_annotations(path)
    assert len(str(e.value)) < 600


def test_bad_annotation_jsonl_names_the_line(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + "{" * 10_000 + "\n")
    with pytest.raises(InputError, match=r"ann\.jsonl:2"):
        load_annotations(path)


def test_annotation_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "ann.json"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(InputError, match="FIFO"):
        load_annotations(fifo)


@pytest.mark.parametrize("vid", ["../../etc/passwd", "..", "a/b"])
def test_video_ids_cannot_climb_out(tmp_path, vid):
    q = MCQuestion("1-1", vid, vid, "short", "?", ("A. x", "B. y"), "A")
    with pytest.raises(InputError, match="is not a name"):
        find_video(tmp_path, q)


@pytest.fixture
def needle_dir(tmp_path):
    d = tmp_path / "needles"
    write_needle_dir(d, make_needles(2, size=32))
    return d


def _rewrite_rows(d, fn):
    path = d / "needles.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(fn(r)) + "\n" for r in rows))


def test_needles_load(needle_dir):
    assert len(load_needles(needle_dir, 32)) == 2


@pytest.mark.parametrize("image", ["../../../../etc/hostname", "/etc/hostname", ""])
def test_needle_images_cannot_leave_the_folder(needle_dir, image):
    _rewrite_rows(needle_dir, lambda r: {**r, "image": image})
    with pytest.raises(InputError, match=r"needles\.jsonl:1"):
        load_needles(needle_dir, 32)


def test_needle_image_link_out_of_the_folder_refused(needle_dir, tmp_path):
    (tmp_path / "outside.png").write_bytes((needle_dir / "images" / "needle_0.png").read_bytes())
    (needle_dir / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    _rewrite_rows(needle_dir, lambda r: {**r, "image": "images/link.png"})
    with pytest.raises(InputError, match="resolves outside"):
        load_needles(needle_dir, 32)


def test_needle_manifest_rows_checked(needle_dir):
    path = needle_dir / "needles.jsonl"
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(InputError, match="expected a JSON object"):
        load_needles(needle_dir, 32)
    path.write_text('{"image": "a", "image": "b"}\n')
    with pytest.raises(InputError, match="duplicate key"):
        load_needles(needle_dir, 32)


def test_needle_secret_manifest_checked(tmp_path):
    path = tmp_path / "needle_eval.jsonl"
    path.write_text('{"conversations": [{"from": "gpt", "value": "7"}]}\n')
    assert numbers_from_manifest(path) == ["7"]
    for bad in ('{"conversations": 3}', '{"conversations": [1]}', "[" * 5000 + "]" * 5000):
        path.write_text(bad + "\n")
        with pytest.raises(InputError, match=r"needle_eval\.jsonl:1"):
            numbers_from_manifest(path)
