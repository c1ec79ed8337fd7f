"""VideoMME-style harness: both published annotation layouts, per-bucket accuracy, and an end
to end run on a synthetic set with a model rigged to always answer one letter."""

from __future__ import annotations

import json

import pytest

from longvila_jax.eval.videomme import accuracy_by_duration, run_videomme
from longvila_jax.eval.videomme_annotations import (
    load_annotations,
    parse_annotations,
    question_text,
)
from longvila_jax.eval.videomme_synthetic import make_synthetic_videomme

# Two rows in the HF lmms-lab/Video-MME layout (field names and value styles as published).
HF_ROWS = [
    {
        "video_id": "001",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
        "videoID": "fFjv93ACGo8",
        "question_id": "001-1",
        "task_type": "Counting Problem",
        "question": "When demonstrating the Germany modern Christmas tree is initially decorated "
        "with apples, candles and berries, which kind of the decoration has the largest number?",
        "options": [
            "A. Apples.",
            "B. Candles.",
            "C. Berries.",
            "D. The three kinds are of the same number.",
        ],
        "answer": "C",
    },
    {
        "video_id": "301",
        "duration": "medium",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=5yPVbTnsXUU",
        "videoID": "5yPVbTnsXUU",
        "question_id": "301-1",
        "task_type": "Object Recognition",
        "question": "Which of the following is not shown in the video?",
        "options": ["A. A castle.", "B. A bridge.", "C. A ship.", "D. A train."],
        "answer": "D",
    },
]

# The official GitHub template layout (evaluation/output_test_template.json).
NESTED = [
    {
        "video_id": "001",
        "duration_category": "short",
        "video_category": "Knowledge",
        "video_subcategory": "Humanity & History",
        "questions": [
            {
                "question_id": "001-1",
                "task_type": "Object Reasoning",
                "question": "Which statement is not correct?",
                "choices": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
                "answer": "A",
                "response": "D",
            },
            {
                "question_id": "001-2",
                "task_type": "Attribute Perception",
                "question": "What is she wearing?",
                "choices": ["A. Black shirts.", "B. Blue shirts.", "C. Red skirts.", "D. Hat."],
                "answer": "D",
                "response": "D",
            },
        ],
    }
]


def test_parse_hf_rows(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HF_ROWS))
    qs = load_annotations(path)
    assert [q.question_id for q in qs] == ["001-1", "301-1"]
    assert [q.duration for q in qs] == ["short", "medium"]
    assert qs[0].videoID == "fFjv93ACGo8" and qs[0].video_id == "001"
    assert qs[0].letters == ("A", "B", "C", "D") and qs[0].answer == "C"
    assert qs[1].task_type == "Object Recognition" and qs[1].domain == "Knowledge"
    text = question_text(qs[1])
    assert text.startswith("Select the best answer to the following multiple-choice question")
    assert text.endswith("C. A ship.\nD. A train.\nThe best answer is:")
    (tmp_path / "ann.json").write_text(json.dumps(HF_ROWS))
    assert load_annotations(tmp_path / "ann.json") == qs


def test_parse_official_template():
    qs = parse_annotations(NESTED)
    assert [(q.question_id, q.duration, q.answer) for q in qs] == [
        ("001-1", "short", "A"),
        ("001-2", "short", "D"),
    ]
    assert qs[1].options[3] == "D. Hat." and qs[0].videoID == "001"
    assert qs[0].sub_category == "Humanity & History"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": "E"}, r"\[0\]: answer 'E' is not one of the option letters"),
        ({"duration": "huge"}, r"\[0\]: duration 'huge'"),
        ({"options": ["Apples", "B. x"]}, r"option 'Apples' does not start with a letter"),
        ({"question": None}, r"\[0\]: missing field 'question'"),
    ],
)
def test_parse_errors_name_the_record(change, message):
    row = {**HF_ROWS[0], **change}
    with pytest.raises(ValueError, match=message):
        parse_annotations([row, HF_ROWS[1]], "ann")


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pyarrow"):
            load_annotations(tmp_path / "t.parquet")
        return
    pq.write_table(pa.Table.from_pylist(HF_ROWS), tmp_path / "t.parquet")
    assert [q.question_id for q in load_annotations(tmp_path / "t.parquet")] == ["001-1", "301-1"]


def test_accuracy_by_duration():
    recs = [
        {"duration": "short", "correct": True},
        {"duration": "short", "correct": False},
        {"duration": "long", "correct": True},
        {"duration": "long", "correct": True},
        {"duration": "long", "correct": False},
    ]
    acc = accuracy_by_duration(recs)
    assert acc["short"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert acc["medium"] == {"correct": 0, "total": 0, "accuracy": None}
    assert acc["long"]["accuracy"] == pytest.approx(2 / 3)
    assert acc["overall"] == {"correct": 3, "total": 5, "accuracy": 0.6}


@pytest.mark.slow
def test_end_to_end_letter_scoring_per_bucket(tiny_cfg, tokenizer, rig, tmp_path):
    """A model rigged to answer "A" scores exactly the share of B answers in every bucket."""
    from helpers.eval_models import make_model

    from longvila_jax.infer.prompts import prompt_ids

    ann = make_synthetic_videomme(tmp_path / "set", per_bucket=2, fps=2, base_seconds=2)
    rows = json.loads(ann.read_text())
    assert {r["duration"] for r in rows} == {"short", "medium", "long"}
    q0 = parse_annotations(rows)[0]
    last = int(prompt_ids(tokenizer, question_text(q0), 4, template="qwen2", image_token_id=3)[-1])
    letter_a = tokenizer("A", add_special_tokens=False)["input_ids"]
    model = rig(make_model(tiny_cfg, 2), [last], letter_a)
    res = run_videomme(model, tokenizer, ann, tmp_path / "set/videos", 4, out_dir=tmp_path / "o")
    assert [q["prediction"] for q in res["questions"]] == ["A"] * len(rows)
    for bucket in ("short", "medium", "long"):
        sel = [r for r in rows if r["duration"] == bucket]
        expected = sum(r["answer"] == "A" for r in sel) / len(sel)
        assert res["accuracy"][bucket]["accuracy"] == pytest.approx(expected)
        assert res["accuracy"][bucket]["total"] == len(sel)
    # The seed-0 set has A-shares 2/4, 3/4, 1/4: the buckets are told apart.
    assert [res["accuracy"][b]["correct"] for b in ("short", "medium", "long")] == [2, 3, 1]
    overall = sum(r["answer"] == "A" for r in rows) / len(rows)
    assert res["accuracy"]["overall"]["accuracy"] == pytest.approx(overall)
    assert res["errors"] == 0
    saved = json.loads((tmp_path / "o/results.json").read_text())
    assert saved["accuracy"] == res["accuracy"]


def test_missing_video_is_named(tiny_model, tokenizer, tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(HF_ROWS[:1]))
    with pytest.raises(ValueError, match="001-1: no video fFjv93ACGo8.mp4"):
        run_videomme(tiny_model, tokenizer, ann, tmp_path, 4)
