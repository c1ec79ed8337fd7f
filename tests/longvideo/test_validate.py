"""The writer's answers are parsed strictly (``longvideo.validate``): a bad answer as a whole is
refused with its reason, and each bad pair is dropped with its own reason."""

from __future__ import annotations

import json

import pytest

from longvila_jax.data.clips import Clip
from longvila_jax.longvideo.validate import QA, BadAnswer, check_answer, check_item

CLIPS = [Clip(0, 0.0, 10.0), Clip(1, 10.0, 20.0), Clip(2, 20.0, 25.0)]


def qa(category="attributes", question="What colour is the wall?", answer="Red.", clips=(0,)):
    return {"category": category, "question": question, "answer": answer, "clips": list(clips)}


@pytest.mark.parametrize(
    "item, reason",
    [
        ("not a dict", "bad_item"),
        ({"category": "counting", "question": "q", "answer": "1"}, "bad_item"),
        ({**qa(), "extra": 1}, "bad_item"),
        (qa(question=3), "bad_item"),
        (qa(category="gossip"), "bad_category"),
        (qa(answer="  "), "empty_text"),
        (qa(question="x" * 401), "too_long"),
        (qa(clips=()), "bad_clips"),
        (qa(clips=(0, 0)), "bad_clips"),
        (qa(clips=(3,)), "bad_clips"),
        (qa(clips=(-1,)), "bad_clips"),
        ({**qa(), "clips": [True]}, "bad_clips"),
        ({**qa(), "clips": "0"}, "bad_clips"),
        (qa(category="needle", clips=(0, 1)), "needle_not_one_clip"),
        (qa(category="counting", answer="three squares"), "count_not_a_number"),
        (qa(question="What is shown at 00:15?"), "timestamp_outside_clips"),
        (qa(answer="It changes at 00:30.", clips=(2,)), "timestamp_outside_clips"),
        (qa(answer="At 00:75 it turns red."), "timestamp_outside_clips"),
    ],
)
def test_bad_pairs_are_dropped_with_their_reason(item, reason):
    assert check_item(item, CLIPS) == reason


def test_good_pairs_are_kept():
    assert check_item(qa(category="counting", answer="3 squares", clips=(1, 0)), CLIPS) == QA(
        "counting", "What colour is the wall?", "3 squares", (0, 1)
    )
    # Timestamps inside a cited clip, its end included (written floored to whole seconds).
    item = qa(question="What happens between 00:10 and 00:20?", answer="At 00:25 ...", clips=(1, 2))
    assert isinstance(check_item(item, CLIPS), QA)


def test_whole_answers_and_duplicates():
    pairs = [
        qa(),
        qa(question="what  colour is the WALL?"),  # the same question
        qa(category="counting", question="How many?", answer="2"),
        qa(category="needle", question="What number is shown at 00:12?", clips=(1,)),
        qa(category="causal", question="Why?", answer="x", clips=(9,)),
    ]
    text = "```json\n" + json.dumps({"summary": " A video. ", "qa": pairs}) + "\n```"
    checked = check_answer(text, CLIPS, max_qa=2)
    assert checked.summary == "A video."
    assert [p.question for p in checked.qa] == ["What colour is the wall?", "How many?"]
    assert dict(checked.dropped) == {"duplicate": 1, "over_limit": 1, "bad_clips": 1}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Sure! Here it is: {}", "not_json"),
        ('{"summary": "a", "qa": []} trailing', "not_json"),
        ('{"summary": "a", "summary": "b", "qa": []}', "not_json"),  # duplicate key
        ("[1, 2]", "not_an_object"),
        ('{"qa": []}', "missing_summary"),
        ('{"summary": "", "qa": []}', "bad_summary"),
        ('{"summary": 3, "qa": []}', "bad_summary"),
        ('{"summary": "a"}', "missing_qa"),
        ('{"summary": "a", "qa": {}}', "bad_qa"),
        ('{"summary": "a", "qa": [' * 20 + "]" * 20 + "}", "not_json"),  # too deep
    ],
)
def test_unusable_answers_are_refused(text, reason):
    with pytest.raises(BadAnswer) as e:
        check_answer(text, CLIPS, max_qa=8)
    assert e.value.reason == reason
