"""Per-sample isolation: a hostile record costs one counted skip, never the run; ``fail_fast``.

Each case is an attack that used to stop training (or ``data.check``): a lone UTF-16 surrogate
in a conversation (the tokenizer raised ``TypeError``), a token id of 2**64 (``OverflowError``
in numpy), a JSONL line nested 100000 deep (``RecursionError`` in ``json.loads``), a JSON-list
manifest nested 100000 deep (``RecursionError`` at start-up), and manifests that are FIFOs
(a read that blocks forever).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from helpers.limits import time_limit

from longvila_jax.core.errors import InputError
from longvila_jax.data import sources
from longvila_jax.data.pipeline import DataIterator, DatasetChanged, stream_fingerprint
from longvila_jax.data.samples import INDEX_BITS, SampleProcessor
from longvila_jax.data.skips import (
    SampleError,
    SampleSkipped,
    SkipRateExceeded,
    TooLongSample,
    is_skip,
)
from longvila_jax.data.sources import ManifestError, ManifestSource

DEEP = 100_000
# Raw JSONL lines. The surrogate is the JSON escape \ud800 (valid JSON, not valid UTF-8 text).
SURROGATE = (
    b'{"id": "sur", "image": "images/img_0000.png", "conversations": '
    b'[{"from": "human", "value": "<image>\\nWhat number is \\ud800?"}, '
    b'{"from": "gpt", "value": "8"}]}'
)
BIG_ID = b'{"id": "big", "text": [5, 18446744073709551616]}'  # 2**64
DEEP_LINE = b'{"id": "deep", "text": ' + b"[" * DEEP + b"]" * DEEP + b"}"


@pytest.fixture(scope="module")
def hostile_root(corpus, tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    """The corpus plus ``texts.jsonl`` and ``imgs.jsonl`` with hostile lines; returns the root
    and the indices of the good lines of each manifest."""
    root = tmp_path_factory.mktemp("hostile")
    for p in corpus.iterdir():
        (root / p.name).symlink_to(p)
    text = (corpus / "text.jsonl").read_bytes().splitlines()[:4]
    texts = [text[0], BIG_ID, text[1], DEEP_LINE, text[2], text[3]]
    (root / "texts.jsonl").write_bytes(b"\n".join(texts) + b"\n")
    imgs = (corpus / "images.jsonl").read_bytes().splitlines()[:2] + [SURROGATE]
    (root / "imgs.jsonl").write_bytes(b"\n".join(imgs) + b"\n")
    return root, {"texts": [0, 2, 4, 5], "imgs": [0, 1]}


def _cfg(make_cfg, root: Path, name: str, **kw):
    kind = "text" if name == "texts" else "image"
    kw = {"max_skip_rate": 1.0, **kw}
    datasets = [{"name": name, "manifest": f"{name}.jsonl", "kind": kind}]
    return make_cfg(root, root=str(root), shuffle=False, num_epochs=1, datasets=datasets, **kw)


def _run(cfg) -> tuple[DataIterator, list[int]]:
    it = DataIterator(cfg, 0, 1)
    mask = (1 << INDEX_BITS) - 1
    got = [int(i) & mask for b in it for i in b["sample_index"].ravel() if i >= 0]
    return it, got


def test_huge_token_id_and_deep_line_are_bad_records(hostile_root, make_cfg):
    root, good = hostile_root
    it, got = _run(_cfg(make_cfg, root, "texts"))
    assert it.skip_counts == {"bad_record": 2}
    assert got == good["texts"]  # the other samples still come out, in order
    assert it.samples_seen == 6
    assert it.get_state()["pack"]["skips"]["counts"] == {"bad_record": 2}


def test_lone_surrogate_is_bad_text_encoding(hostile_root, make_cfg):
    root, good = hostile_root
    it, got = _run(_cfg(make_cfg, root, "imgs"))
    assert it.skip_counts == {"bad_text_encoding": 1}
    assert got == good["imgs"]


def test_unexpected_exception_is_a_counted_error_reason(hostile_root, make_cfg, monkeypatch):
    """Without the UTF-8 check the tokenizer's TypeError reaches the catch-all: the sample is
    skipped as ``error:TypeError``, counted, and seen by the skip-rate guard."""
    root, good = hostile_root
    monkeypatch.setattr(sources, "_unencodable", lambda value: None)
    it, got = _run(_cfg(make_cfg, root, "imgs"))
    assert it.skip_counts == {"error:TypeError": 1}
    assert got == good["imgs"]
    cfg = _cfg(make_cfg, root, "imgs", skip_window=3, max_skip_rate=0.1)
    with pytest.raises(SkipRateExceeded, match="top reasons so far: error:TypeError=1"):
        _run(cfg)
    proc = SampleProcessor(cfg)
    out = proc({"dataset": "imgs", "index": 2, "raw": SURROGATE})
    assert is_skip(out) and out["skip_reason"] == "error:TypeError"
    assert out["sample_id"] == "imgs:sur" and 0 < len(out["detail"]) <= 400
    proc = SampleProcessor(dataclasses.replace(cfg, fail_fast=True))
    with pytest.raises(SampleError, match="sample imgs:sur: error:TypeError") as e:
        proc({"dataset": "imgs", "index": 2, "raw": SURROGATE})
    assert isinstance(e.value.__cause__, TypeError)


def test_fail_fast_raises_naming_the_sample(hostile_root, make_cfg):
    root, _ = hostile_root
    with pytest.raises(SampleError, match=r"sample texts:big: bad_record \(token id") as e:
        _run(_cfg(make_cfg, root, "texts", fail_fast=True))
    assert e.value.sample_id == "texts:big" and e.value.reason == "bad_record"
    assert isinstance(e.value.__cause__, SampleSkipped)


def test_fail_fast_shapes_no_fingerprint(corpus, make_cfg):
    """A run may resume with or without ``fail_fast``: the same rows come out."""
    datasets = [{"name": "text", "manifest": "text.jsonl", "kind": "text"}]
    cfg = make_cfg(corpus, datasets=datasets, shuffle=False)
    ff = dataclasses.replace(cfg, fail_fast=True)
    assert stream_fingerprint(cfg) == stream_fingerprint(ff)
    it = DataIterator(cfg, 0, 1)
    next(it)
    state = it.get_state()
    want = next(it)["sample_index"].tolist()
    resumed = DataIterator(ff, 0, 1)
    resumed.set_state(state)
    assert next(resumed)["sample_index"].tolist() == want


def test_hostile_manifests_fail_at_start_naming_dataset_and_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(ManifestError, match=r"dataset 'd' manifest: .*deep\.json.*deeper than 64"):
        ManifestSource(deep, "d")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "id": 2}]')
    with pytest.raises(ManifestError, match=r"dataset 'b' manifest: .*bad\.json.*duplicate key"):
        ManifestSource(bad, "b")
    for name in ("fifo.json", "fifo.jsonl", "fifo.arrayrecord"):
        os.mkfifo(tmp_path / name)
        with time_limit(20), pytest.raises(ManifestError, match=f"{name} is a FIFO"):
            ManifestSource(tmp_path / name, "f")
    with pytest.raises(ManifestError, match="dataset 'x': .*unknown extension '.txt'"):
        ManifestSource(bad.with_suffix(".txt"), "x")


def test_data_errors_are_input_errors():
    """The CLIs print these as one ``error: ...`` line (exit 1) instead of a traceback."""
    for cls in (DatasetChanged, ManifestError, SampleError, SkipRateExceeded, TooLongSample):
        assert issubclass(cls, InputError), cls
    e = SampleError("texts:big", "bad_record", "x" * 10_000)
    assert len(str(e)) < 600 and json.dumps(str(e))
