"""``backends.spec``: parsing ``local:DIR`` / ``openai:URL[#model]`` / ``oracle``, refusing
everything else with a message naming the spec, and opening the right backend per role."""

from __future__ import annotations

import pytest
from helpers.openai_stub import StubServer, last_user_text

from longvila_jax.backends.base import ChatRequest
from longvila_jax.backends.openai_chat import OpenAIChat
from longvila_jax.backends.oracle import OracleCaptioner, OracleWriter
from longvila_jax.backends.oracle_judge import OracleJudge
from longvila_jax.backends.spec import open_backend, parse_spec
from longvila_jax.core.errors import CheckpointError


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("local:/ckpt/tiny", ("local", "/ckpt/tiny", None)),
        ("local:relative/dir", ("local", "relative/dir", None)),
        ("openai:http://127.0.0.1:8000/v1", ("openai", "http://127.0.0.1:8000/v1", None)),
        (
            "openai:https://api.example.com/v1#gpt-x",
            ("openai", "https://api.example.com/v1", "gpt-x"),
        ),
        (" oracle ", ("oracle", None, None)),
    ],
)
def test_parse_valid_specs(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("openai:ftp://host/v1", "http:// or https://"),
        ("openai:localhost:8000/v1", "http:// or https://"),
        ("openai:http://", "http:// or https://"),
        ("openai:http://host/v1#", "empty model"),
        ("local:", "needs a directory"),
        ("/data/ckpt", "local:/data/ckpt"),
        ("ckpt", "local:ckpt"),
        ("C:\\models\\tiny", "local:C:"),
        ("gemini:http://host", "unknown kind"),
        ("", "non-empty"),
    ],
)
def test_parse_refuses_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_spec(spec)
    if spec:
        assert spec in str(info.value)


def test_oracle_by_role():
    backends = [open_backend("oracle", role) for role in ("captioner", "writer", "judge")]
    assert [type(b) for b in backends] == [OracleCaptioner, OracleWriter, OracleJudge]
    for backend in backends:
        backend.close()


def test_bad_role_and_unknown_option():
    with pytest.raises(ValueError, match="role"):
        open_backend("oracle", "critic")
    with pytest.raises(ValueError, match="concurency"):
        open_backend("oracle", "writer", concurency=3)


def test_openai_spec_takes_its_options_only():
    def answer(model, messages):
        return f"{model}: {last_user_text(messages)}"

    with StubServer(answer, models=("a", "b")) as stub:
        # batch_size is LocalChat's: accepted (one option set serves every spec) and unused.
        backend = open_backend(
            f"openai:{stub.url}#b", "captioner", concurrency=2, batch_size=4, backoff_s=0.01
        )
        (reply,) = backend.chat([ChatRequest("k", "hi")])
        backend.close()
    assert isinstance(backend, OpenAIChat)
    assert backend.name == f"openai:{stub.url}#b" and reply.text == "b: hi"
    assert backend.concurrency == 2


def test_local_spec_loads_the_directory(tmp_path):
    # An empty directory reaches the checkpoint loader, whose error names it.
    with pytest.raises(CheckpointError, match="neither a project checkpoint"):
        open_backend(f"local:{tmp_path}", "writer", concurrency=3)
