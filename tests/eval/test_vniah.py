"""V-NIAH harness: 1 fps sampling, needle insertion, prompt layout, exact-match scoring on rigged
models through the real code path, and the sequence-parallel run against one device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longvila_jax.data.text import IMAGE_TOKEN
from longvila_jax.eval.haystack import (
    cell_visual_index,
    frame_sources,
    insert_position,
    load_haystack,
    one_fps_indices,
)
from longvila_jax.eval.needles import Needle, load_needles, make_needles
from longvila_jax.eval.vniah import exact_match, run_vniah
from longvila_jax.infer.prompts import prompt_ids
from longvila_jax.models.vlm import expand_prompts

DEPTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize(
    ("count", "fps", "max_frames", "expected"),
    [
        (40, 8.0, 100, [0, 8, 16, 24, 32]),
        (40, 8.0, 3, [0, 8, 16]),
        (100, 29.97, 4, [0, 30, 60, 90]),
        (10, 2.5, 10, [0, 2, 4, 6, 8]),  # Python round: 2.5 -> 2, as upstream
        (12, 3.5, 10, [0, 4, 8]),  # 3.5 -> 4
        (5, 0.4, 10, [0, 1, 2, 3, 4]),  # < 1 fps: every frame
    ],
)
def test_one_fps_indices(count, fps, max_frames, expected):
    assert one_fps_indices(count, fps, max_frames).tolist() == expected


def test_one_fps_rejects_bad_fps():
    with pytest.raises(ValueError, match="fps"):
        one_fps_indices(10, 0.0, 5)


def test_load_haystack_takes_one_frame_per_second(tmp_path):
    from longvila_jax.data.video import write_video

    # 8 fps, 5 s; frame i has grey level 40 * (i // 8) + 20: one level per second.
    frames = np.stack([np.full((32, 32, 3), 20 + 40 * (i // 8), np.uint8) for i in range(40)])
    write_video(tmp_path / "h.mp4", frames, fps=8)
    out = load_haystack(tmp_path / "h.mp4", 4, 32)
    assert out.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), [20, 60, 100, 140], atol=4)
    with pytest.raises(ValueError, match="only 5 frames at 1 fps"):
        load_haystack(tmp_path / "h.mp4", 6, 32)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (10, [0, 2, 4, 6, 8, 10]),
        (5, [0, 1, 2, 3, 4, 5]),
        (7, [0, 1, 2, 4, 5, 7]),  # int(): 1.4 -> 1, 2.8 -> 2, 4.2 -> 4, 5.6 -> 5
        (1, [0, 0, 0, 0, 0, 1]),
    ],
)
def test_needle_insertion_index(n, expected):
    assert [insert_position(n, d) for d in DEPTHS] == expected
    for d, k in zip(DEPTHS, expected, strict=True):
        src = frame_sources(n, d, needle_row=99)
        assert len(src) == n + 1
        assert src[k] == 99
        assert np.delete(src, k).tolist() == list(range(n))


def test_depth_out_of_range():
    with pytest.raises(ValueError, match="depth"):
        insert_position(8, 1.2)


def test_needle_lands_at_its_frame_slot_in_the_expanded_sequence(tokenizer, tiny_cfg):
    """The needle's visual tokens sit right after k frame blocks of tpf + 1 positions."""
    n, tpf = 6, tiny_cfg.tokens_per_frame
    ids = prompt_ids(tokenizer, "Q?", n + 1, template="qwen2", image_token_id=3)
    pre = int(np.flatnonzero(ids == 3)[0])  # text tokens before the first frame
    ex = expand_prompts(
        ids[None],
        num_frames=n + 1,
        image_token_id=3,
        tokens_per_frame=tpf,
        vocab_size=tiny_cfg.llm.vocab_size,
    )
    needle_row = 50
    for d in DEPTHS:
        vi = cell_visual_index(ex.visual_index[0], n, d, needle_row, tpf)
        k = insert_position(n, d)
        start = pre + k * (tpf + 1)  # each earlier frame: tpf tokens + "\n"
        assert vi[start : start + tpf].tolist() == [needle_row * tpf + o for o in range(tpf)]
        rows = vi[vi >= 0] // tpf
        assert (rows == needle_row).sum() == tpf
        assert [r for r in rows[::tpf] if r != needle_row] == list(range(n))


@pytest.mark.parametrize(
    ("pred", "answer", "ok"),
    [
        ("Apple", "apple", True),
        (" 4 2 ", "42", True),
        ("4\t2\n", "42", True),
        ("VIOLET", "Violet", True),
        ("43", "42", False),
        ("", "42", False),
        ("42.", "42", False),
    ],
)
def test_exact_match(pred, answer, ok):
    assert exact_match(pred, answer) is ok


def test_prompt_layout_qwen2(tokenizer):
    ids = prompt_ids(tokenizer, "Q?", 2, template="qwen2", image_token_id=3)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "<image>\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(ids.tolist()) == expected
    bare = prompt_ids(
        tokenizer, "Q?", 2, template="qwen2", image_token_id=3, newline_after_frame=False
    )
    assert f"{IMAGE_TOKEN}{IMAGE_TOKEN}Q?" in tokenizer.decode(bare.tolist())
    assert len(ids) - len(bare) == 2  # one "\n" token per frame


def test_prompt_maps_the_tokenizer_image_id(tokenizer):
    ids = prompt_ids(tokenizer, "Q?", 3, template="qwen2", image_token_id=400)
    assert (ids == 400).sum() == 3 and (ids == 3).sum() == 0


def test_needles_roundtrip(tmp_path):
    from longvila_jax.eval.needles import write_needles

    made = make_needles(3, kind="mixed", numbers=["12", "34"], words=["apple"])
    write_needles(tmp_path, made)
    back = load_needles(tmp_path, 64)
    assert [(n.question, n.answer) for n in back] == [(n.question, n.answer) for n in made]
    np.testing.assert_array_equal(back[0].image, made[0].image)  # PNG is lossless
    (tmp_path / "needles.jsonl").write_text('{"image": "images/needle_0.png", "question": ""}\n')
    with pytest.raises(ValueError, match="needles.jsonl:1: field 'question'"):
        load_needles(tmp_path, 64)


def _rigged(cfg, rig, tokenizer, needle: Needle, n: int, emit: str):
    """A model that, teacher-forced on ``needle.answer``, emits ``emit`` (same token count)."""
    from helpers.eval_models import make_model

    prompt = prompt_ids(tokenizer, needle.question, n + 1, template="qwen2", image_token_id=3)
    answer = tokenizer(needle.answer, add_special_tokens=False)["input_ids"]
    out = tokenizer(emit, add_special_tokens=False)["input_ids"]
    if len(out) != len(answer):
        pytest.fail(f"{emit!r} and {needle.answer!r} must have the same token count")
    return rig(make_model(cfg, 1), [int(prompt[-1]), *answer[:-1]], out)


@pytest.mark.slow
def test_rigged_model_scores_one_and_wrong_model_zero(tiny_cfg, tokenizer, haystack, rig, tmp_path):

    needle = make_needles(1, numbers=["37"])[0]
    n = 4
    right = _rigged(tiny_cfg, rig, tokenizer, needle, n, "37")
    res = run_vniah(
        right,
        tokenizer,
        haystack,
        [needle],
        [n],
        [0.0, 0.5, 1.0],
        out_dir=tmp_path / "right",
        batch_size=3,
    )
    assert res["scores"] == [[1.0], [1.0], [1.0]]
    assert all(r["token_match"] for c in res["cells"] for r in c["results"])
    saved = json.loads((tmp_path / "right/results.json").read_text())
    assert saved["mean_score"] == 1.0 and (tmp_path / "right/heatmap.png").stat().st_size > 0

    wrong = _rigged(tiny_cfg, rig, tokenizer, needle, n, "52")
    res = run_vniah(wrong, tokenizer, haystack, [needle], [n], [0.0, 0.5, 1.0], batch_size=3)
    assert res["scores"] == [[0.0], [0.0], [0.0]]
    assert {r["prediction"] for c in res["cells"] for r in c["results"]} == {"52"}


def test_case_and_space_insensitive_through_the_harness(tiny_cfg, tokenizer, haystack, rig):
    """The model emits "Apple" where the needle answer is "apple": text match, token mismatch."""
    image = make_needles(1, kind="word", words=["apple"])[0].image
    needle = Needle("w", image, "What is the secret word shown in the video?", "apple")
    model = _rigged(tiny_cfg, rig, tokenizer, needle, 4, "Apple")
    res = run_vniah(model, tokenizer, haystack, [needle], [4], [0.5])
    r = res["cells"][0]["results"][0]
    assert r["prediction"] == "Apple" and r["exact"] and not r["token_match"]
    assert res["scores"] == [[1.0]]


@pytest.mark.slow
def test_sequence_parallel_run_equals_single_device(tiny_model, tokenizer, haystack, needles_dir):
    from helpers.eval_models import ROOT

    from longvila_jax.config.base import load_config
    from longvila_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(load_config(MeshConfig, ROOT / "configs/mesh/cpu8_r2u4.yaml", []))
    args = (tiny_model, tokenizer, haystack, needles_dir, [5], [0.0, 0.6, 1.0])
    one = run_vniah(*args, batch_size=3)
    sp = run_vniah(*args, mesh=mesh, batch_size=3)
    assert sp["mesh"]["ring"] == 2 and sp["mesh"]["ulysses"] == 4
    assert int(sp["sequence_length"]["5"]) % 16 == 0
    for c1, c2 in zip(one["cells"], sp["cells"], strict=True):
        for r1, r2 in zip(c1["results"], c2["results"], strict=True):
            assert r1["prediction"] == r2["prediction"]
            np.testing.assert_allclose(r2["answer_logprob"], r1["answer_logprob"], rtol=1e-5)


def test_numbers_from_manifest(tmp_path):
    from longvila_jax.eval.needles import numbers_from_manifest

    rows = [
        {
            "video": "a.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nQ"},
                {"from": "gpt", "value": "41"},
            ],
        },
        {
            "video": "b.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nQ"},
                {"from": "gpt", "value": " 17 "},
            ],
        },
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert numbers_from_manifest(tmp_path / "m.jsonl") == ["41", "17"]


@pytest.mark.slow
def test_demo_vniah_writes_heatmap_at_multiples(tiny_model, tokenizer, tmp_path):
    from longvila_jax.eval.vniah_demo import demo_vniah

    res = demo_vniah(
        tiny_model,
        tokenizer,
        tmp_path,
        2,
        multiples=(1, 2),
        depths=[0.0, 1.0],
        numbers=["41", "17"],
    )
    assert res["frame_counts"] == [2, 4] and res["needles"] == ["needle-0", "needle-1"]
    assert [c["insert_at"] for c in res["cells"]] == [0, 2, 0, 4]
    assert np.asarray(res["scores"]).shape == (2, 2)
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    assert len(load_needles(tmp_path / "needles", 64)) == 2
    assert load_haystack(tmp_path / "haystack.mp4", 4, 64).shape == (4, 64, 64, 3)


def test_run_vniah_rejects_repeats_and_short_haystack(tiny_model, tokenizer, haystack, needles_dir):
    with pytest.raises(ValueError, match="must not repeat"):
        run_vniah(tiny_model, tokenizer, haystack, needles_dir, [4], [0.5, 0.5])
    with pytest.raises(ValueError, match="only 10 frames at 1 fps"):
        run_vniah(tiny_model, tokenizer, haystack, needles_dir, [4, 12], [0.5])
