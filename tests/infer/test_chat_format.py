"""The checkpoint's own chat template, the Llama-3 end tokens and doubled BOS, the release
config, and upstream's inference frame rule (``infer.chat_format``, ``infer.release``,
``infer.frames``), each against an independent rendering or upstream's formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.chat_tokenizers import llama3_like

from longvila_jax.core.errors import ConfigError
from longvila_jax.data.synthetic import train_tokenizer
from longvila_jax.data.text import IMAGE_TOKEN, LLAMA3_SYSTEM, load_tokenizer
from longvila_jax.infer import prompts
from longvila_jax.infer.chat_format import builtin_format, chat_format
from longvila_jax.infer.frames import inference_frame_indices
from longvila_jax.infer.release import parse_release_config, read_release_config

OWN = (
    "{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'] }}<|endoftext|>"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)
MODEL_IMAGE = 900  # the model's placeholder id, different from the tokenizer's


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("own_template")
    train_tokenizer(["[USER] [ASSISTANT] What is shown? A red ball."] * 8, out)
    tok = load_tokenizer(out)
    tok.chat_template = OWN
    return tok


@pytest.fixture(scope="module")
def llama3():
    return llama3_like([LLAMA3_SYSTEM, "system user assistant What is shown? A red ball."])


def test_the_tokenizers_own_template_renders_the_prompt(own_tokenizer):
    fmt = chat_format(own_tokenizer, "qwen2")
    assert fmt.name == "tokenizer" and fmt.end_tokens == ("<|endoftext|>",)
    ids = prompts.prompt_ids(own_tokenizer, "What is shown?", 2, template=fmt, image_token_id=900)
    # Independently: HF renders and tokenises with the tokenizer's template, then the
    # tokenizer's <image> ids become the model's placeholder.
    content = f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhat is shown?"
    want = own_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    image = own_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.tolist() == [MODEL_IMAGE if t == image else t for t in want]
    assert own_tokenizer.decode(ids[ids != MODEL_IMAGE]).startswith("[USER]")
    stops = prompts.stop_ids(own_tokenizer, fmt)
    assert own_tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops


def test_config_template_name_wins_and_unknown_names_are_refused(own_tokenizer):
    fmt = chat_format(own_tokenizer, "qwen2", "qwen2", upstream=True)
    assert fmt.name == "config:qwen2" and fmt.template == builtin_format("qwen2").template
    with pytest.raises(ConfigError, match="chat_template"):
        chat_format(own_tokenizer, "qwen2", "mistral")
    no_own = own_tokenizer.chat_template
    try:
        own_tokenizer.chat_template = None
        assert chat_format(own_tokenizer, "llama").name == "llama_3"
    finally:
        own_tokenizer.chat_template = no_own


def test_llama3_stops_at_eot_and_end_of_text(llama3):
    stops = prompts.stop_ids(llama3, "llama_3")
    want = {llama3.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    assert set(stops) == want and len(want) == 2


def test_llama3_v1_prompt_starts_with_a_doubled_bos(llama3):
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    header = llama3.convert_tokens_to_ids("<|start_header_id|>")
    image = llama3.convert_tokens_to_ids(IMAGE_TOKEN)
    upstream = chat_format(llama3, "llama", upstream=True)
    ids = prompts.prompt_ids(llama3, "Q?", 1, template=upstream, image_token_id=image).tolist()
    # Upstream v1: the system string's literal BOS after tokenizer_image_token's kept auto BOS.
    assert ids[:3] == [bos, bos, header]
    ours = prompts.prompt_ids(llama3, "Q?", 1, template="llama_3", image_token_id=image).tolist()
    assert ours[:2] == [bos, header] and ours[1:] == ids[2:]
    # Upstream V-NIAH drops the automatic BOS (safe_tokenize): one BOS.
    vniah = prompts.vniah_upstream_ids(llama3, "Q?", 2, template="llama_3", image_token_id=image)
    assert vniah.tolist()[:2] == [bos, header]


def test_release_config(tmp_path):
    assert parse_release_config({}) == parse_release_config({"fps": None})
    cfg = parse_release_config({"chat_template": "qwen2", "num_video_frames": 256, "fps": 2})
    assert (cfg.chat_template, cfg.num_video_frames, cfg.fps) == ("qwen2", 256, 2.0)
    for bad in ({"fps": -1}, {"fps": "2"}, {"num_video_frames": 0}, {"chat_template": 3}):
        with pytest.raises(ConfigError):
            parse_release_config(bad)
    (tmp_path / "llm").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"fps": 1.0, "num_video_frames": 8}))
    assert read_release_config(tmp_path).fps == 1.0
    assert read_release_config(tmp_path / "llm") is None  # no VILA layout there


def _upstream(frame_count, video_fps, num_frames, fps):
    # llava/utils/media.py::_load_video on VILA main, written out.
    duration_sec = frame_count / video_fps if video_fps > 0 else 0
    if fps > 0:
        timestamps = np.arange(0, duration_sec, 1.0 / fps)
        timestamps = timestamps[:num_frames]
        return [int(t * video_fps) for t in timestamps]
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int).tolist()


@pytest.mark.parametrize(
    "frame_count,video_fps,num_frames,fps",
    [(300, 30.0, 8, 1.0), (300, 29.97, 64, 2.0), (100, 25.0, 8, 0.5), (300, 30.0, 8, 0.0),
     (7, 30.0, 16, 0.0), (1000, 24.0, 5, 3.0)],
)  # fmt: skip
def test_inference_frame_rule(frame_count, video_fps, num_frames, fps):
    got = inference_frame_indices(frame_count, video_fps, num_frames, fps).tolist()
    assert got == _upstream(frame_count, video_fps, num_frames, fps)
    if fps > 0:  # the first num_frames / fps seconds, one frame every 1 / fps seconds
        assert got[0] == 0 and len(got) == min(
            num_frames, int(np.ceil(frame_count / video_fps * fps))
        )
        assert got[-1] <= (num_frames / fps) * video_fps
    else:
        assert got[0] == 0 and got[-1] == frame_count - 1
