"""``backends.local.LocalChat`` on a tiny random checkpoint saved to disk (the serving tests'
``write_checkpoint``): batched answers with mixed prompt lengths and frame counts equal
``Generator.generate`` one request at a time; greedy and sampled requests are not mixed; a
system message replaces the template's default; a bad video fails only its slot."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.serve_fixture import QUESTION, write_checkpoint, write_clip

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, ClipMedia
from longvila_jax.backends.local import LocalChat
from longvila_jax.data.clips import decode_clip
from longvila_jax.data.text import QWEN2_SYSTEM
from longvila_jax.infer.sampling import SamplingParams

NEW = 6  # max_tokens of every request


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    ckpt = write_checkpoint(tmp)
    clip = write_clip(tmp / "clip.mp4", n=12)  # 3 s at 4 fps, 64 px
    backend = LocalChat(ckpt, batch_size=3)
    try:
        yield backend, clip, tmp
    finally:
        backend.close()


def reference(backend: LocalChat, request: ChatRequest):
    """Generator.generate on one request alone (frames decoded in this process)."""
    gen = backend.generator
    frames = np.zeros((0, 64, 64, 3), np.uint8)
    if request.media is not None:
        m = request.media
        frames = decode_clip(m.path, gen.cfg.vision.image_size, m.start_s, m.end_s, m.num_frames)
    sampling = SamplingParams(
        max_new_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed
    )
    return gen.generate(request.prompt, frames=frames, sampling=sampling)


def test_batched_answers_equal_one_at_a_time(setup):
    backend, clip, _ = setup
    requests = [
        ChatRequest("text", QUESTION, max_tokens=NEW),
        ChatRequest(
            "two", "What colour is it?", media=ClipMedia(str(clip), 0, 3, 2), max_tokens=NEW
        ),
        ChatRequest("four", QUESTION, media=ClipMedia(str(clip), 0.5, 2.5, 4), max_tokens=NEW),
        ChatRequest("sampled", QUESTION, max_tokens=NEW, temperature=1.5, seed=4),
        ChatRequest("text2", "blue green 7 and a red video", max_tokens=NEW),
    ]
    replies = backend.chat(requests)
    assert all(isinstance(r, ChatReply) for r in replies), replies
    for request, reply in zip(requests, replies, strict=True):
        ref = reference(backend, request)
        assert reply.text == ref.text, request.key
        assert reply.prompt_tokens == ref.prompt_tokens, request.key
        stopped = ref.finish_reason == "stop"
        assert reply.completion_tokens == len(ref.tokens) - stopped, request.key
        assert reply.model == "ckpt" and reply.attempts == 1
    # Frames cost tokens_per_frame - 1 = 3 extra tokens each beyond their placeholder.
    assert replies[2].prompt_tokens > replies[0].prompt_tokens + 3 * 4 - 1
    usage = backend.usage.as_dict()
    assert usage["requests"] >= 5 and usage["failures"] == 0
    assert backend.name.startswith("local:") and backend.name.endswith("ckpt")


def test_system_message_replaces_the_default(setup):
    backend, _, _ = setup
    plain, same, other = backend.chat(
        [
            ChatRequest("plain", QUESTION, max_tokens=NEW),
            ChatRequest("same", QUESTION, system=QWEN2_SYSTEM, max_tokens=NEW),
            ChatRequest("other", QUESTION, system="Answer in one word.", max_tokens=NEW),
        ]
    )
    # The default system prompt given explicitly renders the very same prompt: it replaced the
    # default rather than being added as a second system turn.
    assert (same.text, same.prompt_tokens) == (plain.text, plain.prompt_tokens)
    assert other.prompt_tokens != plain.prompt_tokens


def test_bad_video_fails_its_slot_only(setup):
    backend, clip, tmp = setup
    bad = tmp / "bad.mp4"
    bad.write_bytes(b"\x00" * 300)
    requests = [
        ChatRequest("ok", QUESTION, media=ClipMedia(str(clip), 0, 3, 2), max_tokens=NEW),
        ChatRequest("bad", QUESTION, media=ClipMedia(str(bad), 0, 3, 2), max_tokens=NEW),
        ChatRequest("late", QUESTION, media=ClipMedia(str(clip), 5, 9, 2), max_tokens=NEW),
        ChatRequest("long", QUESTION, max_tokens=5000),
    ]
    before = backend.usage.failures
    ok, bad_error, late, long = backend.chat(requests)
    assert isinstance(ok, ChatReply) and ok.text == reference(backend, requests[0]).text
    assert isinstance(bad_error, BackendError) and (bad_error.key, bad_error.kind) == (
        "bad",
        "media",
    )
    assert isinstance(late, BackendError) and late.kind == "media"
    assert "too_few_frames" in late.detail  # the clip ends at 3 s
    assert isinstance(long, BackendError) and long.kind == "too_long"
    assert backend.usage.failures - before == 3


def test_from_generator_and_bad_arguments(setup):
    backend, _, _ = setup
    wrapped = LocalChat.from_generator(backend.generator, "tiny-random", batch_size=2)
    (reply,) = wrapped.chat([ChatRequest("t", QUESTION, max_tokens=NEW)])
    assert reply.model == "tiny-random" and wrapped.name == "tiny-random"
    assert reply.text == reference(backend, ChatRequest("t", QUESTION, max_tokens=NEW)).text
    with pytest.raises(ValueError, match="batch_size"):
        LocalChat.from_generator(backend.generator, "x", batch_size=0)
