"""Packing: expanded-layout labels, segment ids, positions, static shapes and skip counting."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from longvila_jax.data.packing import PackIterDataset, RowBuilder, RowShape, expand_segment
from longvila_jax.data.skips import SkipRateExceeded, skip_marker

IMG, TPF, IGN = 3, 4, -100
SHAPE = RowShape(
    length=48,
    text_length=32,
    max_frames=6,
    max_segments=4,
    image_size=2,
    tokens_per_frame=TPF,
    image_token_id=IMG,
    pad_id=0,
)


def test_expand_segment_by_hand():
    ids = np.array([10, 3, 11, 12, 13], np.int32)
    sup = np.array([0, 0, 0, 1, 1], bool)
    labels, starts = expand_segment(ids, sup, IMG, TPF)
    assert starts.tolist() == [0, 1, 5, 6, 7]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, 12, 13, IGN]


def _sample(rng, idx, n_text, n_frames, size=2):
    ids = rng.integers(10, 100, n_text).astype(np.int32)
    ids[rng.choice(n_text, n_frames, replace=False)] = IMG
    sup = rng.random(n_text) < 0.5
    frames = np.full((n_frames, size, size, 3), idx, np.uint8)
    return {
        "input_ids": ids,
        "supervised": sup,
        "frames": frames,
        "sample_index": idx,
        "sample_id": f"s{idx}",
    }


def _reference_expand(sample):
    """Naive per-token expansion: (token or -1 for visual, supervised flag)."""
    toks, sups = [], []
    for t, s in zip(sample["input_ids"], sample["supervised"], strict=True):
        if t == IMG:
            toks += [-1] * TPF
            sups += [False] * TPF
        else:
            toks.append(int(t))
            sups.append(bool(s))
    return toks, sups


def test_row_builder_matches_reference():
    rng = np.random.default_rng(0)
    samples = [_sample(rng, 7, 6, 2), _sample(rng, 8, 5, 0), _sample(rng, 9, 4, 1)]
    b = RowBuilder(SHAPE)
    for s in samples:
        assert b.fits(s)
        b.add(s)
    row = b.build()
    assert {k: v.shape for k, v in row.items()} == {
        "input_ids": (32,),
        "text_segment_ids": (32,),
        "text_to_expanded": (32,),
        "frames": (6, 2, 2, 3),
        "frame_mask": (6,),
        "frame_segment_ids": (6,),
        "segment_ids": (48,),
        "positions": (48,),
        "labels": (48,),
        "sample_index": (4,),
    }
    e = 0
    for seg, s in enumerate(samples, start=1):
        toks, sups = _reference_expand(s)
        m = len(toks)
        assert (row["segment_ids"][e : e + m] == seg).all()
        assert row["positions"][e : e + m].tolist() == list(range(m))
        want = [toks[t + 1] if t + 1 < m and sups[t + 1] else IGN for t in range(m)]
        assert row["labels"][e : e + m].tolist() == want
        e += m
    assert (row["segment_ids"][e:] == 0).all() and (row["labels"][e:] == IGN).all()
    # Text tokens land where the reference puts them; padding points past the row.
    t = 0
    for seg, s in enumerate(samples, start=1):
        n = len(s["input_ids"])
        assert (row["text_segment_ids"][t : t + n] == seg).all()
        assert (row["input_ids"][t : t + n] == s["input_ids"]).all()
        t += n
    assert (row["text_to_expanded"][t:] == 48).all() and (row["input_ids"][t:] == 0).all()
    expanded_tokens = np.full(48, -1)
    keep = row["text_segment_ids"] > 0
    expanded_tokens[row["text_to_expanded"][keep]] = row["input_ids"][keep]
    ref = sum((_reference_expand(s)[0] for s in samples), [])
    visual_first = [i for i, v in enumerate(ref) if v == -1][::TPF]
    ref = [IMG if i in visual_first else v for i, v in enumerate(ref)]
    assert expanded_tokens[: len(ref)].tolist() == ref
    # Frames in placeholder order, normalised, masked and tagged with their segment.
    assert row["frame_mask"].tolist() == [True] * 3 + [False] * 3
    assert row["frame_segment_ids"].tolist() == [1, 1, 3, 0, 0, 0]
    np.testing.assert_allclose(
        row["frames"][:3, 0, 0, 0], (np.array([7, 7, 9]) / 255 - 0.5) / 0.5, atol=1e-6
    )
    assert row["sample_index"].tolist() == [7, 8, 9, -1]


def _pack(elements, shape=SHAPE, window=1000, rate=1.0):
    ds = grain.MapDataset.source(elements).to_iter_dataset()
    return iter(PackIterDataset(ds, shape, window, rate))


def test_packing_limits_order_and_skips():
    rng = np.random.default_rng(1)
    elements = []
    for i in range(40):
        if i % 7 == 3:
            elements.append(skip_marker("missing_file" if i % 2 else "too_long", f"s{i}"))
        else:
            elements.append(_sample(rng, i, int(rng.integers(3, 12)), int(rng.integers(0, 3))))
    it = _pack(elements)
    rows = list(it)
    got = [int(i) for r in rows for i in r["sample_index"] if i >= 0]
    assert got == [e["sample_index"] for e in elements if "sample_index" in e]
    for r in rows:
        seg = r["segment_ids"]
        # Segments are contiguous runs 1, 2, ..., k followed only by padding: they never mix.
        changes = seg[np.flatnonzero(np.diff(seg)) + 1]
        k = int(seg.max())
        assert seg[0] == 1 and changes.tolist() == list(range(2, k + 1)) + (
            [0] if seg[-1] == 0 else []
        )
        assert r["frame_mask"].sum() <= SHAPE.max_frames
        assert int(np.sum(r["input_ids"] == IMG)) == int(r["frame_mask"].sum())
        for s in range(1, k + 1):
            assert r["positions"][seg == s].tolist() == list(range(int(np.sum(seg == s))))
            assert r["labels"][seg == s][-1] == IGN
    assert dict(it.skips.counts) == {"missing_file": 3, "too_long": 3}
    assert it.skips.seen == 40


def test_skip_rate_guard_names_reasons():
    rng = np.random.default_rng(2)
    elements = [
        skip_marker("corrupt_image", f"s{i}") if i % 5 == 0 else _sample(rng, i, 4, 0)
        for i in range(100)
    ]
    it = _pack(elements, window=20, rate=0.1)
    with pytest.raises(SkipRateExceeded, match=r"20\.0% of the last 20 samples.*corrupt_image=5"):
        list(it)
    it = _pack(elements, window=20, rate=0.2)  # at the threshold: allowed
    assert len(list(it)) > 0
