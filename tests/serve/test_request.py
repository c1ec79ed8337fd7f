"""The request checker and the stop-string streaming, without a server: every refusal names its
field, the accepted forms become the expected ``ChatRequest``, and stop strings are cut
exactly, also when they straddle tokens."""

from __future__ import annotations

import base64
import json

import pytest

from longvila_jax.infer.answer_text import AnswerText
from longvila_jax.serve.errors import APIError
from longvila_jax.serve.limits import Limits
from longvila_jax.serve.request import parse_body

LIMITS = Limits(max_new_tokens=200)
VIDEO = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00 ftypisom").decode()


def parse(body, media_root=True):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_body(raw, LIMITS, model_id="tiny", media_root=media_root)


def user(*parts):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}]}


def test_a_full_request_is_read():
    body = user(
        {"type": "video_url", "video_url": {"url": VIDEO}},
        {"type": "text", "text": "What?"},
    )
    body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    body.update(max_tokens=9, temperature=0.5, top_p=0.9, stop="x", seed=7, stream=True)
    body.update(frames=4, stream_options={"include_usage": True}, user="me")
    req = parse(body)
    assert req.question == "What?" and req.history == ({"role": "system", "content": "Be brief."},)
    assert req.media[0].kind == "video" and req.media[0].data.startswith(b"\x00\x00\x00 ftyp")
    assert (req.max_tokens, req.temperature, req.top_p, req.seed) == (9, 0.5, 0.9, 7)
    assert req.stop == ("x",) and req.stream and req.include_usage and req.frames == 4
    # Defaults: the CLI's (greedy, seed 0, 128 tokens); a path under the media root.
    req = parse(user({"type": "video_url", "video_url": {"url": "clips/a.mp4"}}))
    assert (req.temperature, req.seed, req.max_tokens) == (0.0, 0, 128)
    assert req.media[0].path == "clips/a.mp4" and req.question == ""


@pytest.mark.parametrize(
    "change, param, status",
    [
        ({"model": "other"}, "model", 404),
        ({"messages": "hi"}, "messages", 400),
        ({"max_tokens": 201}, "max_tokens", 400),
        ({"max_tokens": True}, "max_tokens", 400),
        ({"temperature": "hot"}, "temperature", 400),
        ({"top_p": 0}, "top_p", 400),
        ({"seed": 1.5}, "seed", 400),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
        ({"stop": [""]}, "stop[0]", 400),
        ({"n": 2}, "n", 400),
        ({"logprobs": True}, "logprobs", 400),
        ({"frame": 8}, "frame", 400),
        ({"fps": -1}, "fps", 400),
        ({"stream_options": {"x": 1}}, "stream_options", 400),
    ],
)
def test_bad_fields_are_named(change, param, status):
    body = user({"type": "text", "text": "hi"})
    body.update(change)
    with pytest.raises(APIError) as e:
        parse(body)
    assert e.value.status == status and e.value.param == param
    assert e.value.body()["error"]["param"] == param and param in e.value.message


@pytest.mark.parametrize(
    "part, param, code",
    [
        (
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@"}},
            "url",
            "invalid_base64",
        ),
        (
            {"type": "video_url", "video_url": {"url": "http://10.0.0.1/x.mp4"}},
            "url",
            "unsupported_url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            "url",
            "unsupported_url",
        ),
        ({"type": "image_url", "image_url": {"url": VIDEO}}, "url", "invalid_media_type"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4,raw"}}, "url", "invalid_value"),
        ({"type": "audio", "audio": {}}, "type", "invalid_value"),
        ({"type": "text", "text": 3}, "text", "invalid_value"),
    ],
)
def test_bad_parts_are_named(part, param, code):
    with pytest.raises(APIError) as e:
        parse(user(part, {"type": "text", "text": "q"}))
    assert e.value.status == 400 and e.value.code == code
    assert (
        e.value.param
        == f"messages[0].content[0]{'.' + part['type'] if param == 'url' else ''}.{param}"
    )


def test_paths_need_a_media_root_and_media_go_last():
    with pytest.raises(APIError) as e:
        parse(user({"type": "video_url", "video_url": {"url": "a.mp4"}}), media_root=False)
    assert e.value.param == "messages[0].content[0].video_url.url"
    body = user({"type": "text", "text": "q"})
    body["messages"].insert(
        0, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}
    )
    with pytest.raises(APIError) as e:
        parse(body)
    assert e.value.param == "messages[0].content[0].image_url.url"
    body["messages"] = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(APIError) as e:
        parse(body)
    assert e.value.param == "messages[0].role"


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'{"a": 1, "a": 2}', b"\xff", b'{"x": NaN}'])
def test_malformed_bodies_name_the_body(raw):
    with pytest.raises(APIError) as e:
        parse(raw)
    assert e.value.status == 400 and e.value.param == "body"


class CharTokenizer:
    """One character per token id (ord), enough to test the text logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize(
    "stop, want",
    [((), "hello world"), (("lo w",), "hel"), (("xyz", "o"), "hell"), (("d",), "hello worl")],
)
def test_stop_strings_cut_the_stream_exactly(stop, want):
    text = AnswerText(CharTokenizer(), stop)
    sent = ""
    for ch in "hello world":
        sent += text.add(ord(ch))
        assert want.startswith(sent)  # nothing past a stop string ever leaves
        if text.stopped:
            break
    sent += text.flush()
    assert sent == want and text.stopped == bool(stop and want != "hello world")
