"""Stage-2 COYO records in upstream's ``LazyCoyoDataset`` form (``kind: coyo``).

Upstream (NVlabs/VILA ``llava/data/dataset.py``, 386d350 and b760c34) turns each caption into
``"<image>\\n{caption}<eos>"`` (a literal ``<image>`` in the caption becomes ``<IMAGE>``), with no
chat template and no question; labels are the ids with the pad id masked; 4 consecutive records
form one item and a trailing incomplete group is dropped. The expected ids are tokenised here from
the rendered string; the expected labels follow the shift-by-one rule written out below.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.data.pipeline import build_dataset, build_sources
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.sources import GroupedSource
from longvila_jax.data.text import image_token_id

CAPTIONS = [
    "a red square",
    "the number 7 on <image> blue",  # upstream writes the literal tag as <IMAGE>
    "two cats",
    "a long caption about a green field at dusk",
    "left over: never used",  # 5th record: the incomplete group is dropped
]


@pytest.fixture
def coyo_cfg(corpus, make_cfg, tmp_path):
    lines = [
        json.dumps({"image": f"images/img_{i:04d}.png", "caption" if i % 2 else "text": c})
        for i, c in enumerate(CAPTIONS)
    ]
    (tmp_path / "coyo.jsonl").write_text("\n".join(lines) + "\n")
    ds = {"name": "coyo", "manifest": str(tmp_path / "coyo.jsonl"), "kind": "coyo"}
    return make_cfg(corpus, datasets=[ds], shuffle=False, num_epochs=1, max_segments_per_row=8)


def _expected(tok, caption: str) -> tuple[list[int], list[bool]]:
    text = "<image>\n" + caption.replace("<image>", "<IMAGE>") + tok.eos_token
    ids = tok(text, add_special_tokens=True)["input_ids"]
    sup = [t != image_token_id(tok) and t != tok.pad_token_id for t in ids]
    return ids, sup


def test_coyo_group_tokens_and_supervision(coyo_cfg, tokenizer):
    sources = build_sources(coyo_cfg)
    assert isinstance(sources[0], GroupedSource) and len(sources[0]) == 1  # 5 records -> 1 group
    out = SampleProcessor(coyo_cfg)(sources[0][0])
    assert "skip_reason" not in out, out
    want = [_expected(tokenizer, c) for c in CAPTIONS[:4]]
    assert out["parts"].tolist() == [len(ids) for ids, _ in want]
    assert out["input_ids"].tolist() == [t for ids, _ in want for t in ids]
    assert out["supervised"].tolist() == [s for _, sup in want for s in sup]
    assert out["frames"].shape[0] == 4
    # No template: no chat control token anywhere, and the EOS is a supervised target.
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in out["input_ids"]
    eos = tokenizer.eos_token_id
    assert eos != tokenizer.pad_token_id and out["supervised"][out["input_ids"] == eos].all()


def test_coyo_group_packs_as_separate_segments(coyo_cfg, tokenizer):
    tpf = coyo_cfg.tokens_per_frame
    row = next(iter(build_dataset(coyo_cfg, process_index=0, process_count=1)))
    e = 0
    for j, caption in enumerate(CAPTIONS[:4]):
        ids, sup = _expected(tokenizer, caption)
        # Expanded layout: the <image> takes tpf slots; labels[t] = target of position t.
        width = [tpf if t == image_token_id(tokenizer) else 1 for t in ids]
        starts = np.cumsum(width) - width
        m = int(sum(width))
        labels = np.full(m, IGNORE_INDEX)
        for i in range(1, len(ids)):
            if sup[i]:
                labels[starts[i] - 1] = ids[i]
        np.testing.assert_array_equal(row["segment_ids"][e : e + m], j + 1)
        np.testing.assert_array_equal(row["positions"][e : e + m], np.arange(m))
        np.testing.assert_array_equal(row["labels"][e : e + m], labels)
        assert row["sample_index"][j] == j  # dataset 0, record j
        e += m
    assert (row["segment_ids"][e:] == 0).all() and row["sample_index"][4] == -1
    assert row["frame_mask"].sum() == 4
