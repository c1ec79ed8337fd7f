"""The serving tests' fixtures: a tiny checkpoint with a tokenizer, a short video, and
``python -m longvila_jax.serve`` started on a free loopback port (imported by path).

The model is the tiny Qwen2 LongVILA (``configs/model/tiny-qwen2.yaml``) with random weights,
saved as a project checkpoint (integrity manifest included) with the synthetic corpus's
tokenizer under ``hf/llm``, so ``load_pretrained`` / ``load_tokenizer`` read it like any
checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from flax import nnx

from helpers.eval_models import TINY, make_model
from helpers.xla_env import jax_env

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "configs/mesh/cpu8_r2u4.yaml"
QUESTION = "What number is shown?"
API_KEY = "test-key-123"


def write_checkpoint(tmp: Path, seed: int = 3) -> Path:
    """A tiny project checkpoint at ``tmp/ckpt`` with its tokenizer; returns the path."""
    from longvila_jax.ckpt import orbax_io
    from longvila_jax.config.base import load_config
    from longvila_jax.config.model import ModelConfig
    from longvila_jax.core import trees
    from longvila_jax.data.synthetic import NEEDLE_QUESTION, train_tokenizer

    texts = [QUESTION, NEEDLE_QUESTION, "a red video showing the number 42", "blue green 7"] * 8
    train_tokenizer(texts, tmp / "tok")
    model = make_model(load_config(ModelConfig, TINY), seed=seed)
    inv = {v: k for k, v in orbax_io.ATTR.items()}
    out = tmp / "ckpt"
    with orbax_io.checkpoint_dir(out) as staging:
        orbax_io.write_metadata(staging, model.cfg, {"source": {"layout": "random"}})
        writer = orbax_io.ParamWriter(staging)
        for attr, sub in nnx.to_pure_dict(nnx.state(model)).items():
            for path, value in trees.leaves(sub):
                writer.save(inv[attr], path, np.asarray(value))
        writer.finalize()
        shutil.copytree(tmp / "tok", staging / orbax_io.HF_DIR / "llm")
    return out


def write_clip(path: Path, n: int = 12, seed: int = 0) -> Path:
    """A 64 px mp4 of ``n`` frames (pairs of random frames) at 4 fps."""
    from longvila_jax.data.video import write_video

    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.integers(0, 256, (n // 2, 1, 64, 64, 3), dtype=np.uint8), 2, axis=1)
    write_video(path, frames.reshape(n, 64, 64, 3), fps=4)
    return path


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m longvila_jax.serve`` in a subprocess on a free loopback port."""

    def __init__(self, ckpt: Path, media_root: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "longvila_jax.serve", "--model", str(ckpt)]
        args += ["--model-id", "tiny", "--mesh", str(MESH), "--port", str(self.port)]
        args += ["--media-root", str(media_root), *extra]
        env = jax_env(8)
        env["LONGVILA_API_KEY"] = API_KEY
        self.log = log
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                status, body = self.get("/health")
                if status == 200 and body["status"] == "ok":
                    return
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, parsed JSON or text) of one request; errors are returned, not raised."""
        headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", "/v1/chat/completions", data, headers)

    def stop(self) -> int:
        return stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM (the server drains), SIGKILL after 60 s; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
