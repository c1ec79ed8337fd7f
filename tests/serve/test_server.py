"""``python -m longvila_jax.serve`` end to end, with real clients: the ``openai`` package
(answers identical to ``python -m longvila_jax.infer`` for the same inputs and seed), 20 bad
requests of 17 kinds, a bounded load test, a client that goes away, the UI in headless
Chromium, and SIGTERM draining an in-flight stream.

One server (a subprocess on a free loopback port, 8 simulated CPU devices, the 2D mesh) serves
the whole module, so the model loads and compiles once; the SIGTERM test stops it and runs last.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import threading
import time

import numpy as np
import openai
import pytest
from helpers.serve_fixture import (
    API_KEY,
    MESH,
    QUESTION,
    Server,
    data_url,
    metrics,
    write_checkpoint,
    write_clip,
)

from longvila_jax.infer.__main__ import main as infer_main

NEW = 6  # max_tokens of the compared answers
MAX_PROMPT = 600  # --max-prompt-tokens (the tiny model's context is 4096)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = write_checkpoint(tmp)
    root = tmp / "media"
    root.mkdir()
    clip = write_clip(root / "clip.mp4")
    (tmp / "secret.mp4").write_bytes(clip.read_bytes())  # outside the media root
    server = Server(
        ckpt,
        root,
        tmp / "server.log",
        *("--max-batch", "4", "--max-queue", "6", "--default-new-tokens", str(NEW)),
        *("--max-prompt-tokens", str(MAX_PROMPT), "--max-body-bytes", str(2 << 20)),
        *("--max-new-tokens", "512", "--max-frames", "64"),
    )
    try:
        server.wait_ready()
        yield server, ckpt, clip, tmp
    finally:
        server.stop()


def cli_answer(ckpt, clip, capsys, *flags) -> tuple[str, str]:
    """(answer, stats line) of ``python -m longvila_jax.infer`` (its ``main``, in process)."""
    argv = ["--model", str(ckpt), "--video", str(clip), "--frames", "4", "--mesh", str(MESH)]
    argv += ["--max-new-tokens", str(NEW), *flags, QUESTION]
    capsys.readouterr()
    assert infer_main(argv) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n")
    return out.out[:-1], out.err


def video_message(url: str) -> list[dict]:
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": parts}]


@pytest.fixture
def client(setup):
    server = setup[0]
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


REFERENCE: dict[tuple, tuple[str, str]] = {}


def reference(setup, capsys, *flags):
    """The CLI's answer for these flags, computed once (the load and UI tests reuse it)."""
    if flags not in REFERENCE:
        _, ckpt, clip, _ = setup
        REFERENCE[flags] = cli_answer(ckpt, clip, capsys, *flags)
    return REFERENCE[flags]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "top_p": 0.9, "seed": 3}])
def test_openai_client_gets_the_cli_answer(setup, client, capsys, sampling):
    flags = tuple(x for k, v in sampling.items() for x in (f"--{k.replace('_', '-')}", str(v)))
    want, stats = reference(setup, capsys, *flags)
    assert want, "the reference answer is empty; pick another model seed"
    prompt_tokens = int(stats.split(" frames, ")[1].split(" prompt tokens")[0])
    clip = setup[2]
    kwargs = dict(model="tiny", messages=video_message(data_url(clip)), max_tokens=NEW)
    kwargs.update(sampling, extra_body={"frames": 4})
    done = client.chat.completions.create(**kwargs)
    assert done.choices[0].message.content == want
    assert done.usage.prompt_tokens == prompt_tokens  # 4 frames x 4 visual tokens included
    assert f"{done.usage.completion_tokens} new tokens" in stats
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == want and len(pieces) > 2  # streamed in pieces
    assert finish == done.choices[0].finish_reason
    assert usage.prompt_tokens == prompt_tokens
    # The same video by path under --media-root gives the same answer.
    kwargs["messages"] = video_message("clip.mp4")
    assert client.chat.completions.create(**kwargs).choices[0].message.content == want


def bad_requests(setup) -> list[tuple[str, object, int, str | None, dict | None]]:
    """(kind, body, status, the field the error must name, extra headers)."""
    _, _, clip, tmp = setup
    good = {"model": "tiny", "messages": video_message(data_url(clip)), "frames": 4}
    url = "messages[0].content[0].video_url.url"

    def with_(**change):
        return {**good, **change}

    def video(value):
        return with_(messages=video_message(value))

    garbage = (
        "data:video/mp4;base64,"
        + base64.b64encode(np.arange(3000, dtype=np.uint8).tobytes()).decode()
    )
    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "body", None),
        ("not an object", b"[1, 2]", 400, "body", None),
        ("unknown model", with_(model="gpt-4o"), 404, "model", None),
        ("wrong type", with_(model=7), 400, "model", None),
        ("missing messages", with_(messages=[]), 400, "messages", None),
        (
            "bad role",
            with_(messages=[{"role": "robot", "content": "hi"}]),
            400,
            "messages[0].role",
            None,
        ),
        ("wrong type", with_(max_tokens="many"), 400, "max_tokens", None),
        ("over a limit", with_(max_tokens=100_000), 400, "max_tokens", None),  # over the limit
        ("out of range", with_(temperature=-1), 400, "temperature", None),
        ("out of range", with_(top_p=0), 400, "top_p", None),
        ("wrong type", with_(stream="yes"), 400, "stream", None),
        ("over a limit", with_(frames=100_000), 400, "frames", None),  # over --max-frames
        ("unknown field", with_(frame=8), 400, "frame", None),  # unknown field (a typo)
        ("bad base64", video("data:video/mp4;base64,AAAA!!!="), 400, url, None),
        ("undecodable video", video(garbage), 400, url, None),  # a video that fails to decode
        (
            "remote URL",
            video("https://169.254.169.254/latest/meta-data"),
            400,
            url,
            None,
        ),  # never fetched
        ("path outside the root", video("../secret.mp4"), 400, url, None),  # outside the media root
        (
            "path outside the root",
            video(str(tmp / "secret.mp4")),
            400,
            url,
            None,
        ),  # absolute, outside the root
        (
            "too many tokens",
            with_(messages=[{"role": "user", "content": "word " * 700}]),
            400,
            "messages",
            None,
        ),
        ("unsupported option", with_(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
        ("over a limit", with_(n=3), 400, "n", None),
    ]


def test_bad_requests_get_named_4xx_and_the_server_keeps_serving(setup):
    server = setup[0]
    cases = bad_requests(setup)
    assert len(cases) >= 20
    kinds = set()
    for kind, body, status, param, headers in cases:
        got, error = server.post(body, headers)
        assert got == status, (body if isinstance(body, dict) else body[:60], got, error)
        detail = error["error"]
        assert set(detail) == {"message", "type", "param", "code"}
        assert detail["param"] == param, detail
        if param is not None:
            assert param in detail["message"]
        # No traceback, and no server-side path (the media root, the upload temp files).
        message = detail["message"]
        assert "Traceback" not in message and "longvila-serve-" not in message
        assert str(setup[3] / "media") not in message
        kinds.add(kind)
    assert len(kinds) >= 12, kinds
    # A body over --max-body-bytes is refused from its headers, as curl sends it (Expect:
    # 100-continue): the server answers before a byte of the body is sent.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (
        ("Content-Type", "application/json"),
        ("Content-Length", str(3 << 20)),
        ("Expect", "100-continue"),
        ("Authorization", f"Bearer {API_KEY}"),
    ):
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "body_too_large"
    conn.close()
    kinds.add("body too large")
    # No key, a wrong key, a wrong content type.
    assert server.post({"model": "tiny"}, {"Authorization": ""})[0] == 401
    assert server.post({"model": "tiny"}, {"Authorization": "Bearer nope"})[0] == 401
    assert server.post(b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert server.request("GET", "/nowhere")[1]["error"]["type"] == "not_found_error"
    # The server is alive and answers a good request.
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    history.append({"role": "assistant", "content": "Hello."})  # a multi-turn chat
    messages = history + video_message("clip.mp4")
    status, body = server.post({"model": "tiny", "messages": messages, "frames": 4})
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert server.get("/health") == (200, {"status": "ok", "model": "tiny"})


def test_load_all_answered_or_429_and_metrics_add_up(setup, capsys):
    server = setup[0]
    want, _ = reference(setup, capsys)
    before = metrics(server.get("/metrics")[1])
    clients, per_client = 16, 3
    results: list[tuple[int, str | None, int]] = []
    lock = threading.Lock()
    body = {"model": "tiny", "messages": video_message("clip.mp4"), "frames": 4, "max_tokens": NEW}

    def run():
        for _ in range(per_client):
            status, answer = server.post(body)
            if status == 200:
                row = (status, answer["choices"][0]["message"]["content"], answer["usage"])
            else:
                row = (status, answer["error"]["code"], None)
            with lock:
                results.append(row)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert time.monotonic() - start < 240 and len(results) == clients * per_client  # none lost
    ok = [text for status, text, _ in results if status == 200]
    rejected = [code for status, code, _ in results if status == 429]
    tokens = sum(usage["completion_tokens"] for status, _, usage in results if status == 200)
    assert len(ok) + len(rejected) == len(results), results
    assert ok and all(text == want for text in ok)
    assert all(code == "queue_full" for code in rejected)
    after = metrics(server.get("/metrics")[1])

    def delta(name):
        return after[name] - before.get(name, 0)

    assert delta('longvila_requests_total{outcome="ok"}') == len(ok)
    assert delta('longvila_requests_total{outcome="rejected"}') == len(rejected)
    assert delta("longvila_requests_received_total") == len(results)
    outcomes = sum(v for k, v in after.items() if k.startswith("longvila_requests_total"))
    assert outcomes == after["longvila_requests_received_total"]
    assert after["longvila_queue_length"] == 0 and after["longvila_running_requests"] == 0
    assert delta("longvila_batch_rows_total") == len(ok)
    assert delta("longvila_batches_total") < len(ok)  # some requests shared a batch
    assert delta("longvila_completion_tokens_total") == tokens
    assert server.get("/health")[0] == 200


def open_stream(server, timeout: float):
    """A raw streamed 500-token video request (its socket stays ours to close or read)."""
    body = {"model": "tiny", "messages": video_message("clip.mp4"), "frames": 4}
    body.update(max_tokens=500, stream=True)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def test_a_client_that_goes_away_frees_its_slot(setup):
    server = setup[0]
    before = metrics(server.get("/metrics")[1])
    conn, response = open_stream(server, timeout=60)
    assert response.status == 200
    while b'"content": "' not in (line := response.readline()) or b'"content": ""' in line:
        assert line, "the stream ended before any text"
    conn.sock.close()  # the client goes away mid-answer
    conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = metrics(server.get("/metrics")[1])
        if (
            now['longvila_requests_total{outcome="cancelled"}']
            > before['longvila_requests_total{outcome="cancelled"}']
        ):
            break
        time.sleep(0.2)
    assert (
        now['longvila_requests_total{outcome="cancelled"}']
        == before['longvila_requests_total{outcome="cancelled"}'] + 1
    )
    assert now["longvila_running_requests"] == 0 and now["longvila_queue_length"] == 0
    # Far fewer than 500 tokens were generated for it (cancelled rows count none).
    assert now["longvila_completion_tokens_total"] == before["longvila_completion_tokens_total"]


def browser_missing() -> str | None:
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed; scripts/install_browser.sh could not"
    return None


def test_ui_streams_an_answer_in_headless_chromium(setup, capsys, tmp_path, monkeypatch):
    if reason := browser_missing():
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = setup[0]
    want, stats = reference(setup, capsys)
    prompt_tokens = stats.split(" frames, ")[1].split(" prompt tokens")[0]
    upload = write_clip(tmp_path / "upload.mp4")  # generated here: the clip's frames
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    options = Options()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1000,1300")
    driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver")), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: d.find_element(By.ID, "health").text == "ready")
        driver.find_element(By.ID, "file").send_keys(str(upload))
        driver.find_element(By.ID, "question").send_keys(QUESTION)
        driver.find_element(By.ID, "frames").send_keys("4")
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys(str(NEW))
        driver.find_element(By.ID, "api_key").send_keys(API_KEY)
        driver.find_element(By.ID, "send").click()
        answer = driver.find_element(By.ID, "answer")
        wait.until(
            lambda d: (
                answer.get_attribute("data-done") == "1" or d.find_element(By.ID, "error").text
            )
        )
        assert driver.find_element(By.ID, "error").text == ""
        assert answer.get_attribute("textContent") == want
        assert driver.find_element(By.ID, "s_frames").text == "4"
        assert driver.find_element(By.ID, "s_prompt").text == prompt_tokens
        assert driver.find_element(By.ID, "s_ttft").text.endswith(" s")
        shot = tmp_path / "ui.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        driver.quit()


def test_sigterm_drains_in_flight_requests_then_exits_0(setup):
    """Runs last: it stops the module's server."""
    server = setup[0]
    conn, response = open_stream(server, timeout=120)
    assert response.status == 200
    events = [response.readline()]
    server.proc.send_signal(signal.SIGTERM)  # while the answer is being generated
    for line in iter(response.readline, b""):
        events.append(line)
    data = [e[6:].strip() for e in events if e.startswith(b"data: ")]
    assert data[-1] == b"[DONE]", data[-3:]
    last = json.loads(data[-2])
    assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    assert server.proc.wait(timeout=90) == 0, server.tail()
    with pytest.raises(OSError):
        server.get("/health")  # no longer listening
    assert "Shutting down" in server.tail()
