"""``backends.openai_chat.OpenAIChat`` against a loopback stub endpoint (helpers.openai_stub):
order and the concurrency limit, retries of timeouts / 5xx / malformed answers and their
counting, final errors per slot, media sent as exact PNG frames or one mp4, and the API key."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from helpers.openai_stub import Fault, StubServer, last_user_text, png_frames, video_parts

from longvila_jax.backends.base import BackendError, ChatReply, ChatRequest, ClipMedia
from longvila_jax.backends.openai_chat import OpenAIChat
from longvila_jax.core.errors import InputError
from longvila_jax.data.clips import decode_clip, probe_video
from longvila_jax.data.video import write_video
from longvila_jax.serve.limits import Limits
from longvila_jax.serve.request import parse_body

FAST = {"backoff_s": 0.01, "timeout_s": 30.0}


def echo(model: str, messages: list) -> str:
    return f"{model} says: {last_user_text(messages)}"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 4 s, 8 fps, 64 px video whose frames all differ (random pixels)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8), fps=8)
    return path


def served_media(body: dict) -> list[str]:
    """The media kinds the project's own server (``serve.request``) reads from a body."""
    raw = json.dumps(body).encode()
    return [
        m.kind for m in parse_body(raw, Limits(), model_id=body["model"], media_root=False).media
    ]


def bodies_with(stub: StubServer, text: str) -> int:
    return sum(text in last_user_text(b["messages"]) for b in stub.bodies)


def test_order_and_concurrency_limit():
    # Requests meet at a barrier of 3 inside the server: the batch only completes if three are
    # in flight at once, and the stub's peak count shows that never more than 3 are.
    barrier = threading.Barrier(3)

    def answer(model, messages):
        barrier.wait(timeout=60)
        return echo(model, messages)

    with StubServer(answer) as stub:
        backend = OpenAIChat(stub.url, "stub-model", concurrency=3, **FAST)
        prompts = [f"question {i}" for i in range(9)]
        replies = backend.chat([ChatRequest(f"k{i}", p) for i, p in enumerate(prompts)])
        backend.close()
    assert [r.text for r in replies] == [f"stub-model says: {p}" for p in prompts]
    assert stub.max_in_flight == 3
    assert all(r.attempts == 1 and r.model == "stub-model" for r in replies)
    # The stub counts whitespace-separated words: 2 per prompt, 4 per answer.
    assert backend.usage.as_dict() == {
        "requests": 9,
        "failures": 0,
        "retries": 0,
        "prompt_tokens": 18,
        "completion_tokens": 36,
    }


def test_500_once_then_success_is_one_retry():
    with StubServer(echo, faults={"flaky": [Fault(status=500)]}) as stub:
        backend = OpenAIChat(stub.url, "stub-model", retries=3, **FAST)
        replies = backend.chat([ChatRequest("a", "fine"), ChatRequest("b", "flaky one")])
        backend.close()
    assert [r.text for r in replies] == ["stub-model says: fine", "stub-model says: flaky one"]
    assert [r.attempts for r in replies] == [1, 2]
    assert bodies_with(stub, "flaky") == 2
    assert backend.usage.retries == 1 and backend.usage.failures == 0


def test_timeout_then_success_is_retried():
    with StubServer(echo, faults={"slow": [Fault(delay_s=3.0)]}) as stub:
        backend = OpenAIChat(stub.url, "stub-model", timeout_s=0.5, backoff_s=0.01)
        (reply,) = backend.chat([ChatRequest("s", "slow one")])
        backend.close()
    assert isinstance(reply, ChatReply)
    assert reply.text == "stub-model says: slow one" and reply.attempts == 2
    assert backend.usage.retries == 1


def test_persistent_timeout_is_a_timeout_error():
    with StubServer(echo, faults={"slow": Fault(delay_s=3.0)}) as stub:
        backend = OpenAIChat(stub.url, "stub-model", timeout_s=0.3, retries=1, backoff_s=0.01)
        (reply,) = backend.chat([ChatRequest("s", "slow one")])
        backend.close()
    assert isinstance(reply, BackendError) and reply.kind == "timeout" and reply.key == "s"


def test_persistent_500_fails_its_slot_only():
    with StubServer(echo, faults={"broken": Fault(status=500)}) as stub:
        backend = OpenAIChat(stub.url, "stub-model", retries=2, **FAST)
        requests = [ChatRequest("a", "one"), ChatRequest("b", "broken"), ChatRequest("c", "two")]
        replies = backend.chat(requests)
        backend.close()
    assert replies[0].text == "stub-model says: one" and replies[2].text == "stub-model says: two"
    error = replies[1]
    assert isinstance(error, BackendError)
    assert (error.key, error.kind) == ("b", "http_500")
    assert bodies_with(stub, "broken") == 3  # retries + 1 attempts
    usage = backend.usage.as_dict()
    assert (usage["requests"], usage["failures"], usage["retries"]) == (3, 1, 2)


@pytest.mark.parametrize("malformed", ["not_json", "no_choices", "bad_content"])
def test_malformed_answers_are_retried_then_reported(malformed):
    faults = {"once": [Fault(malformed=malformed)], "always": Fault(malformed=malformed)}
    with StubServer(echo, faults=faults) as stub:
        backend = OpenAIChat(stub.url, "stub-model", retries=2, **FAST)
        once, always = backend.chat([ChatRequest("o", "once"), ChatRequest("a", "always")])
        backend.close()
    assert once.text == "stub-model says: once" and once.attempts == 2
    assert isinstance(always, BackendError) and always.kind == "malformed_response"
    assert bodies_with(stub, "always") == 3
    assert backend.usage.retries == 3


def test_400_is_not_retried():
    with StubServer(echo, faults={"bad": Fault(status=400)}) as stub:
        backend = OpenAIChat(stub.url, "stub-model", retries=3, **FAST)
        (reply,) = backend.chat([ChatRequest("x", "bad request")])
        backend.close()
    assert isinstance(reply, BackendError) and reply.kind == "http_400"
    assert len(stub.bodies) == 1 and backend.usage.retries == 0


def test_frames_are_sent_as_exact_pngs(video):
    def answer(model, messages):
        return f"{len(png_frames(messages))} frames"

    media = ClipMedia(str(video), 1.0, 3.0, 5)
    request = ChatRequest("v/clip-0", "Describe.", system="Be brief.", media=media)
    with StubServer(answer) as stub:
        backend = OpenAIChat(stub.url, "stub-model", frame_size=32, **FAST)
        (reply,) = backend.chat([request])
        backend.close()
    assert reply.text == "5 frames"
    messages = stub.bodies[0]["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 5 + ["text"]
    assert parts[-1]["text"] == "Describe."
    expected = decode_clip(video, 32, 1.0, 3.0, 5)
    np.testing.assert_array_equal(png_frames(messages), expected)
    assert stub.bodies[0]["max_tokens"] == 512 and stub.bodies[0]["temperature"] == 0.0
    assert served_media(stub.bodies[0]) == ["image"] * 5


def test_video_mode_sends_one_mp4(video, tmp_path):
    media = ClipMedia(str(video), 0.0, 2.0, 6)
    with StubServer(echo) as stub:
        backend = OpenAIChat(stub.url, "stub-model", media="video", frame_size=32, **FAST)
        (reply,) = backend.chat([ChatRequest("v", "What happens?", media=media, seed=7)])
        backend.close()
    assert reply.text == "stub-model says: What happens?"
    parts = stub.bodies[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "text"]
    ((mime, data),) = video_parts(stub.bodies[0]["messages"])
    assert mime == "video/mp4"
    sent = tmp_path / "sent.mp4"
    sent.write_bytes(data)
    info = probe_video(sent)
    # 6 frames over 2 s: re-encoded at round(6 / 2) = 3 fps.
    assert (info.frame_count, info.fps) == (6, 3.0)
    assert stub.bodies[0]["seed"] == 7
    assert served_media(stub.bodies[0]) == ["video"]


def test_bad_video_fails_its_slot_without_calling_the_endpoint(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    requests = [
        ChatRequest("bad", "about the bad one", media=ClipMedia(str(bad), 0.0, 1.0, 2)),
        ChatRequest("ok", "text only"),
    ]
    with StubServer(echo) as stub:
        backend = OpenAIChat(stub.url, "stub-model", frame_size=32, **FAST)
        error, reply = backend.chat(requests)
        backend.close()
    assert isinstance(error, BackendError) and (error.key, error.kind) == ("bad", "media")
    assert "unreadable_video" in error.detail
    assert reply.text == "stub-model says: text only"
    assert bodies_with(stub, "bad one") == 0
    assert backend.usage.failures == 1


def test_api_key_from_env_is_sent_and_never_named(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-secret-123")
    with StubServer(echo, models=("first", "second")) as stub:
        backend = OpenAIChat(stub.url, api_key_env="STUB_KEY", **FAST)
        (reply,) = backend.chat([ChatRequest("k", "hello")])
        backend.close()
        monkeypatch.delenv("STUB_KEY")
        keyless = OpenAIChat(stub.url, "second", api_key_env="STUB_KEY", **FAST)
        keyless.chat([ChatRequest("k", "hello")])
        keyless.close()
    assert reply.text == "first says: hello"  # model None: the first one listed
    assert backend.name == f"openai:{stub.url}#first"
    assert "sk-secret" not in backend.name
    assert stub.headers[0]["authorization"] == "Bearer sk-secret-123"
    assert stub.headers[1]["authorization"] == "Bearer none"


def test_endpoint_without_models_and_bad_urls():
    with StubServer(echo, models=()) as stub, pytest.raises(InputError, match=stub.url):
        OpenAIChat(stub.url, **FAST)
    with pytest.raises(ValueError, match="http"):
        OpenAIChat("ftp://example.com/v1", "m")
    with pytest.raises(ValueError, match="media"):
        OpenAIChat("http://127.0.0.1:9/v1", "m", media="audio")
