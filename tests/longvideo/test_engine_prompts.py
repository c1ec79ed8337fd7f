"""The engine's versioned prompt files (``longvideo.prompts``): the shipped ones load, render
with their role's placeholders, and a hostile or mistaken file is refused naming the field."""

from __future__ import annotations

import hashlib

import pytest

from longvila_jax.core.errors import ConfigError
from longvila_jax.longvideo.prompts import PROMPTS_DIR, load_prompt, prompt_file


def test_shipped_prompts_load_and_render():
    cap = load_prompt(prompt_file("captioner", "v1"), "captioner")
    assert cap.version == "caption-v1" and cap.render().startswith("These frames")
    path = prompt_file("writer", "v1")
    assert path == PROMPTS_DIR / "writer_v1.yaml"
    w = load_prompt(path, "writer")
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    text = w.render(
        duration="01:00", num_clips=6, clip_lines="[clip 0 | 00:00-00:10] x {y}", max_qa=5
    )
    assert "01:00" in text and "[clip 0 | 00:00-00:10] x {y}" in text and "at most 5 pairs" in text
    assert w.max_qa == 16 and w.retry_temperature == 0.7


def _write(tmp_path, body: str):
    path = tmp_path / "writer_v9.yaml"
    path.write_text(body)
    return path


GOOD = (
    "version: w9\nrole: writer\nsystem: null\n"
    "template: '{duration} {num_clips} {clip_lines} {max_qa}'\nmax_tokens: 10\ntemperature: 0\n"
)


@pytest.mark.parametrize(
    "body, match",
    [
        (GOOD.replace("role: writer", "role: captioner"), "role"),
        (GOOD.replace("max_tokens: 10", "max_tokens: yes"), "max_tokens"),
        (GOOD.replace("max_tokens: 10", "max_tokens: 0"), "max_tokens"),
        (GOOD.replace("temperature: 0", "temperature: 5"), "temperature"),
        (GOOD.replace(" {max_qa}", ""), "template"),
        (GOOD.replace("{max_qa}", "{max_qa} {secret}"), "template"),
        (GOOD.replace("{max_qa}", "{max_qa.__class__}"), "template"),
        (GOOD.replace("{max_qa}", "{max_qa"), "template"),
        (GOOD + "extra: 1\n", "extra"),
        (GOOD.replace("version: w9\n", ""), "version"),
        ("- a list\n", "mapping"),
        ("a: &x [*x]\n", "prompt file"),
    ],
)
def test_bad_prompt_files_are_refused(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_prompt(_write(tmp_path, body), "writer")


def test_prompt_versions_are_plain_names():
    with pytest.raises(ConfigError, match="prompt_version"):
        prompt_file("writer", "../../etc/passwd")
