"""The one prompt builder (``infer.prompts``): media tags, frame separators, stop ids, the
template of each architecture and the frames' pixel values. V-NIAH's prompt layout and the
tokenizer-to-model placeholder mapping are checked in ``tests/eval/test_vniah.py``; that the
training pipeline builds the same tokens in ``tests/eval/test_heldout.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers.infer_cases import IMAGE, tiny_config

from longvila_jax.data.synthetic import train_tokenizer
from longvila_jax.data.text import IMAGE_TOKEN, load_tokenizer
from longvila_jax.infer import prompts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts_tokenizer")
    train_tokenizer(["What is shown in the video? A red ball, 42."] * 8, out)
    return load_tokenizer(out)


def _ids(tokenizer, question, n=2, **kw):
    return prompts.prompt_ids(
        tokenizer, question, n, template="qwen2", image_token_id=IMAGE, **kw
    ).tolist()


def test_media_tags_in_the_question_are_removed(tokenizer):
    plain = _ids(tokenizer, "What is shown?")
    assert _ids(tokenizer, "<video>\n What is shown? ") == plain
    assert _ids(tokenizer, f"{IMAGE_TOKEN}What is shown?") == plain
    assert plain.count(IMAGE) == 2
    text = tokenizer.decode(plain)
    assert f"user\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhat is shown?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_no_frames_and_bare_placeholders(tokenizer):
    text = tokenizer.decode(_ids(tokenizer, "Q?", n=0))
    assert IMAGE_TOKEN not in text and "user\nQ?<|im_end|>" in text
    bare = tokenizer.decode(_ids(tokenizer, "Q?", n=3, newline_after_frame=False))
    assert f"{IMAGE_TOKEN * 3}Q?" in bare
    with pytest.raises(ValueError, match="template must be one of"):
        prompts.prompt_ids(tokenizer, "Q?", 1, template="chatml", image_token_id=IMAGE)


def test_stop_ids(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # the template's end and the EOS
    assert prompts.stop_ids(tokenizer, "qwen2") == [end]
    extra = prompts.stop_ids(tokenizer, "qwen2", [7, np.int64(9), "<|endoftext|>"])
    assert extra == sorted({end, 7, 9, tokenizer.convert_tokens_to_ids("<|endoftext|>")})
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")  # Llama-3's end token
    assert prompts.stop_ids(tokenizer, "llama_3") == sorted({end, eot}) and eot != end
    assert prompts.stop_ids(None, None, [4, 2]) == [2, 4]
    with pytest.raises(ValueError, match="not a single token"):
        prompts.stop_ids(tokenizer, "qwen2", ["What is shown"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prompts.stop_ids(None, None, ["<|im_end|>"])


def test_answer_ids(tokenizer):
    assert prompts.answer_ids(tokenizer, "42").tolist() == tokenizer("42")["input_ids"]
    with pytest.raises(ValueError, match="needle x: the answer '' tokenizes to nothing"):
        prompts.answer_ids(tokenizer, "", "needle x: the answer")


def test_template_of_each_architecture():
    cfg = tiny_config()
    assert prompts.template_for(cfg) == "qwen2"
    llama = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, arch="llama"))
    assert prompts.template_for(llama) == "llama_3"


def test_pixel_values():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[1] = 255
    pixels = prompts.pixel_values(frames, 4)
    assert pixels.dtype == np.float32 and pixels[0].max() == -1.0 and pixels[1].min() == 1.0
    np.testing.assert_array_equal(prompts.pixel_values(pixels * 0.5, 4), pixels * 0.5)
    with pytest.raises(ValueError, match=r"shape \[n, 8, 8, 3\]"):
        prompts.pixel_values(frames, 8)
    with pytest.raises(ValueError, match="uint8 or normalised floats"):
        prompts.pixel_values(frames.astype(np.int32), 4)
