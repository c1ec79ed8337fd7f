"""Killable video decoding: a persistent child process with a per-sample timeout.

A hung FFmpeg call (a stalled network mount, a pathological stream) blocks inside C code, which a
Python thread can neither interrupt nor abandon safely, and a segfault would take the training
process down with it. So each pipeline process (the main one or a grain worker) owns one decode
server, started lazily with ``python -m longvila_jax.data.sandbox``. Requests and replies are
length-prefixed JSON plus raw uint8 frame bytes over the child's stdin/stdout (no pickle). When a
reply does not arrive within the timeout the child is killed (by its pid) and the sample is
skipped as ``decode_timeout``; a child that dies gives ``decoder_crash``. The next request starts a
fresh child. The child exits when its stdin closes, so it never outlives its parent's pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from longvila_jax.data.skips import SampleSkipped
from longvila_jax.data.video import decode_video

_LEN = struct.Struct("<Q")
CHILD_MODULE = "longvila_jax.data.sandbox"  # the default child: this module's _main


def _write_msg(f: BinaryIO, payload: bytes) -> None:
    f.write(_LEN.pack(len(payload)))
    f.write(payload)
    f.flush()


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def serve(inp: BinaryIO, out: BinaryIO, decode: Callable[..., np.ndarray] = decode_video) -> None:
    """Child loop: decode requests until stdin closes (``decode(**request)`` per request; a
    child module may pass its own, e.g. the server's frame rules in ``serve.decode_child``)."""
    _write_msg(out, b"ready")  # imports done: the parent starts the request clock after this
    while True:
        head = _read_exact(inp, _LEN.size)
        if head is None:
            return
        req = json.loads(_read_exact(inp, _LEN.unpack(head)[0]) or b"{}")
        data = b""
        try:
            frames = decode(**req)
            reply: dict[str, Any] = {"ok": True, "shape": list(frames.shape)}
            data = frames.tobytes()
        except SampleSkipped as e:
            reply = {"ok": False, "reason": e.reason, "detail": e.detail}
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
            reply = {
                "ok": False,
                "reason": "unreadable_video",
                "detail": f"{type(e).__name__}: {e}",
            }
        _write_msg(out, json.dumps(reply).encode())
        if reply["ok"]:
            _write_msg(out, data)


class DecodeSandbox:
    """Runs ``video.decode_video`` in a child process with a timeout.

    Args:
      timeout_s: seconds one request may take.
      startup_timeout_s: seconds a new child may take to import its modules (not counted in
        ``timeout_s``, so a loaded machine does not turn start-up into decode timeouts).
      module: the child's module (``python -m module``), which must run :func:`serve` on its
        stdin/stdout as :func:`_main` does; default this one (``video.decode_video``).
    """

    def __init__(
        self, timeout_s: float, startup_timeout_s: float = 120.0, module: str = CHILD_MODULE
    ):
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.module = module
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into grain worker processes: each worker starts its own child.
        return {
            "timeout_s": self.timeout_s,
            "startup_timeout_s": self.startup_timeout_s,
            "module": self.module,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["timeout_s"], state["startup_timeout_s"], state.get("module", CHILD_MODULE)
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        fd = self._proc.stdout.fileno()
        try:
            head = self._read(fd, _LEN.size, deadline)
            ready = head and self._read(fd, _LEN.unpack(head)[0], deadline)
        except TimeoutError:
            ready = None
        if ready != b"ready":
            self.kill()
            raise RuntimeError(f"video decode sandbox did not start in {self.startup_timeout_s} s")
        return self._proc

    def _read(self, fd: int, n: int, deadline: float) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(n - len(buf), 1 << 24))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def kill(self) -> None:
        """Kills the child (if any); the next request starts a new one."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                if f is not None:
                    f.close()
            self._proc = None

    close = kill

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.kill()

    def decode(self, **request: Any) -> np.ndarray:
        """Decodes one video; arguments as ``video.decode_video`` (JSON-serialisable).

        Returns:
          uint8 [n, size, size, 3].

        Raises:
          SampleSkipped: the decoder's reason, ``decode_timeout`` or ``decoder_crash``.
        """
        path = request.get("path")
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        if proc is None:
            self.kill()
            proc = self._start()
        deadline = time.monotonic() + self.timeout_s
        fd = proc.stdout.fileno()
        try:
            _write_msg(proc.stdin, json.dumps(request).encode())
            head = self._read(fd, _LEN.size, deadline)
            body = head and self._read(fd, _LEN.unpack(head)[0], deadline)
            reply = json.loads(body) if body else None
            data = None
            if reply and reply["ok"]:
                data_head = self._read(fd, _LEN.size, deadline)
                data = data_head and self._read(fd, _LEN.unpack(data_head)[0], deadline)
        except TimeoutError:
            self.kill()
            raise SampleSkipped(
                "decode_timeout", f"{path}: no reply in {self.timeout_s} s"
            ) from None
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None or (reply["ok"] and data is None):
            try:
                code = proc.wait(timeout=5)  # EOF comes just before the exit status
            except subprocess.TimeoutExpired:
                code = None
            self.kill()
            raise SampleSkipped("decoder_crash", f"{path}: decoder exited with {code}")
        if not reply["ok"]:
            raise SampleSkipped(reply["reason"], reply["detail"])
        return np.frombuffer(data, dtype=np.uint8).reshape(reply["shape"])


def _main(decode: Callable[..., np.ndarray] = decode_video) -> None:
    # The protocol owns the original stdout; anything else printed goes to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, proto_out, decode)


if __name__ == "__main__":
    _main()
