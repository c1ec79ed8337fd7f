"""Held-out accuracy (``eval.heldout``): answer positions, agreement with the inference
``Generator``'s teacher forcing, skip counting, and train/V-NIAH prompt identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.eval_models import make_model

from longvila_jax.config.base import apply_overrides, load_yaml
from longvila_jax.config.data import DataConfig
from longvila_jax.data.samples import SampleProcessor
from longvila_jax.data.sources import ManifestSource
from longvila_jax.data.synthetic import NEEDLE_QUESTION, generate
from longvila_jax.data.text import load_tokenizer
from longvila_jax.eval.heldout import answer_positions, heldout_accuracy, with_dataset
from longvila_jax.infer.generate import Generator
from longvila_jax.infer.prompts import prompt_ids
from longvila_jax.models.vlm import expand_prompts

ROOT = Path(__file__).resolve().parents[2]
FRAMES = 8


@pytest.fixture(scope="module")
def needle_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout_corpus")
    generate(out, seed=3, size=64, n_images=2, n_videos=2, n_needles=(2, 3), needle_frames=FRAMES)
    return out


def _data(corpus: Path) -> DataConfig:
    raw = load_yaml(ROOT / "configs/data/synthetic.yaml")
    raw.update(root=str(corpus), num_video_frames=FRAMES, max_frames_per_row=FRAMES)
    data = apply_overrides(DataConfig, raw, ())
    return with_dataset(data, "needle_eval", "needle_eval.jsonl")


def test_answer_positions_point_before_the_answer_tokens():
    img, tpf = 7, 4
    ids = np.array([1, 7, 9, 7, 9, 5, 6, 21, 22, 2, 9], np.int32)
    sup = np.zeros_like(ids, bool)
    sup[7:10] = True  # answer 21 22, then the end-of-turn token
    pos = answer_positions(ids, sup, np.array([21, 22]), img, tpf)
    ex = expand_prompts(ids[None], num_frames=2, image_token_id=img, tokens_per_frame=tpf,
                       vocab_size=64)  # fmt: skip
    # The token after each returned position is the answer token it predicts.
    np.testing.assert_array_equal(ex.text_ids[0, pos + 1], [21, 22])
    assert (ex.visual_index[0, pos + 1] == -1).all()
    with pytest.raises(ValueError, match="do not start with the answer"):
        answer_positions(ids, sup, np.array([22, 21]), img, tpf)


def test_training_prompt_is_the_vniah_prompt(needle_corpus):
    """The stage-5 pipeline and V-NIAH ask a needle question with the same tokens, so the
    V-NIAH score measures what stage 5 taught."""
    data = _data(needle_corpus)
    proc = SampleProcessor(data)
    spec = data.datasets[-1]
    sample = proc(ManifestSource(Path(data.root) / spec.manifest, spec.name)[0])
    tok = load_tokenizer(needle_corpus / "tokenizer")
    answer = json.loads((needle_corpus / "needle_eval.jsonl").read_text().splitlines()[0])
    answer = answer["conversations"][1]["value"]
    prompt = prompt_ids(tok, NEEDLE_QUESTION, FRAMES, template="qwen2", image_token_id=3)
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    n = len(prompt) + len(ans)
    np.testing.assert_array_equal(sample["input_ids"][:n], np.concatenate([prompt, ans]))
    assert (
        sample["supervised"][len(prompt) : n].all()
        and not sample["supervised"][: len(prompt)].any()
    )


def test_matches_the_generator_teacher_forcing(needle_corpus, tiny_cfg):
    model = make_model(tiny_cfg, seed=5)
    data = _data(needle_corpus)
    res = heldout_accuracy(model, data, "needle_eval")
    assert res["scored"] == 3 and res["skipped"] == {}
    tok = load_tokenizer(needle_corpus / "tokenizer")
    gen = Generator(model, tok)
    rows = [json.loads(x) for x in (needle_corpus / "needle_eval.jsonl").read_text().splitlines()]
    for row, got in zip(rows, res["results"], strict=True):
        answer = row["conversations"][1]["value"]
        tf = gen.teacher_forced(
            NEEDLE_QUESTION, answer, video=str(needle_corpus / row["video"]), num_frames=FRAMES
        )
        assert got["answer"] == answer
        assert got["prediction"] == tok.decode(tf.predicted_ids.tolist())
        assert got["exact"] == tf.exact_match
        np.testing.assert_allclose(got["answer_logprob"], tf.logprobs.sum(), rtol=1e-4)
    assert res["accuracy"] == sum(r["exact"] for r in res["results"]) / 3


def test_bad_samples_are_skipped_and_counted(needle_corpus, tiny_cfg, tmp_path):
    rows = (needle_corpus / "needle_eval.jsonl").read_text().splitlines()
    broken = json.loads(rows[1])
    broken["video"] = "videos/does_not_exist.mp4"
    (needle_corpus / "needle_broken.jsonl").write_text("\n".join([rows[0], json.dumps(broken)]))
    data = with_dataset(_data(needle_corpus), "broken", "needle_broken.jsonl")
    res = heldout_accuracy(make_model(tiny_cfg), data, "broken")
    assert res["scored"] == 1 and res["skipped"] == {"missing_file": 1}
    with pytest.raises(ValueError, match="not in the data config"):
        heldout_accuracy(make_model(tiny_cfg), data, "nope")
