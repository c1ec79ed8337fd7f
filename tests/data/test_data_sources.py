"""Manifest sources (JSON, JSONL, ArrayRecord), safe media paths, and end-to-end rows per stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longvila_jax.data.pipeline import DataIterator
from longvila_jax.data.samples import INDEX_BITS
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.sources import ManifestSource, parse_record, resolve_media


def test_jsonl_offsets_and_bad_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": 1}\n\n{"id": 2}\n\xff\xfe\n[3]\n')
    src = ManifestSource(p, "m")
    assert len(src) == 4  # blank line ignored
    assert parse_record(src[1]) == {"id": 2}
    with pytest.raises(SampleSkipped, match="bad_text_encoding"):
        parse_record(src[2])
    with pytest.raises(SampleSkipped, match="bad_record"):
        parse_record(src[3])


def test_json_list_and_errors(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": "x"}]')
    assert parse_record(ManifestSource(tmp_path / "a.json", "a")[0]) == {"id": "x"}
    (tmp_path / "b.json").write_text('{"id": "x"}')
    with pytest.raises(ValueError, match="must hold a JSON list"):
        ManifestSource(tmp_path / "b.json", "b")
    with pytest.raises(ValueError, match="dataset 'c'.*does not exist"):
        ManifestSource(tmp_path / "c.json", "c")


def test_resolve_media(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    assert resolve_media(tmp_path, "a.mp4") == tmp_path / "a.mp4"
    (tmp_path / "link").symlink_to(tmp_path.parent)  # symlinks inside the root are followed
    assert resolve_media(tmp_path, f"link/{tmp_path.name}/a.mp4").exists()
    for bad in ("../a.mp4", "/etc/passwd", "sub/../../a.mp4"):
        with pytest.raises(SampleSkipped, match="path_outside_root"):
            resolve_media(tmp_path, bad)
    with pytest.raises(SampleSkipped, match="missing_file"):
        resolve_media(tmp_path, "b.mp4")
    with pytest.raises(SampleSkipped, match="bad_record"):
        resolve_media(tmp_path, None)


def _rows(make_cfg, corpus, name, manifest, kind, **kw):
    cfg = make_cfg(
        corpus,
        datasets=[{"name": name, "manifest": manifest, "kind": kind}],
        num_epochs=1,
        shuffle=False,
        batch_size=1,
        **kw,
    )
    return [{k: v[0] for k, v in b.items()} for b in DataIterator(cfg, 0, 1)]


def _segments(row):
    for s in range(1, int(row["segment_ids"].max()) + 1):
        yield s, row["segment_ids"] == s, row["text_segment_ids"] == s


def test_arrayrecord_matches_jsonl(corpus, make_cfg, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(corpus / "images.arrayrecord"), "group_size:1")
    for line in (corpus / "images.jsonl").read_text().splitlines():
        w.write(line.encode())
    w.close()
    a = _rows(make_cfg, corpus, "img", "images.jsonl", "image")
    b = _rows(make_cfg, corpus, "img", "images.arrayrecord", "image")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_video_rows_supervise_only_answers(corpus, make_cfg, tokenizer):
    records = json.loads((corpus / "videos_short.json").read_text())
    rows = _rows(make_cfg, corpus, "videos", "videos_short.json", "video", num_video_frames=4)
    seen = 0
    for row in rows:
        for seg, exp, txt in _segments(row):
            idx = int(row["sample_index"][seg - 1]) & ((1 << INDEX_BITS) - 1)
            answer = records[idx]["conversations"][1]["value"]
            labels = row["labels"][exp]
            assert tokenizer.decode(labels[labels != -100]) == answer + "<|im_end|>"
            ids = row["input_ids"][txt]
            assert int(np.sum(ids == 3)) == 4
            assert int(row["frame_mask"][row["frame_segment_ids"] == seg].sum()) == 4
            # 4 frames x (tokens_per_frame 4 - 1) extra positions after expansion.
            assert int(exp.sum()) == int(txt.sum()) + 4 * 3
            seen += 1
    assert seen == len(records)


def test_text_rows_labels_are_next_tokens(corpus, make_cfg):
    rows = _rows(
        make_cfg, corpus, "text", "text.jsonl", "text", max_length=600, max_frames_per_row=0
    )
    records = [json.loads(x) for x in (corpus / "text.jsonl").read_text().splitlines()]
    assert sum(int(r["segment_ids"].max()) for r in rows) == len(records)
    for row in rows:
        for _, exp, txt in _segments(row):
            ids, labels = row["input_ids"][txt], row["labels"][exp]
            assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == -100
            assert row["positions"][exp].tolist() == list(range(len(ids)))
    assert rows[0]["frames"].shape == (0, 32, 32, 3)
