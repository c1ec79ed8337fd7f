"""A request's media to frames: data URLs and paths under ``--media-root``, decoded safely.

Uploaded bytes are written to a private temporary file (a 0700 directory the server owns,
a 0600 file with a random name) and deleted as soon as the frames are read, whatever happens.
Videos are decoded by the project's PyAV decoder in a killable child process
(``data.sandbox.DecodeSandbox`` running ``serve.decode_child``: a hung or crashing decoder is
killed after ``decode_timeout_s`` and the request gets a 400, the server carries on). Images go
through ``data.image.load_image`` (Pillow with its decompression-bomb guard, any mode to RGB).
Frames follow the checkpoint's rule exactly as ``infer.Generator.load_frames`` does, so the
server reads the frames the CLI reads. No URL is ever fetched: ``serve.request`` accepts data
URLs and root-relative paths only.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longvila_jax.core.errors import InputError, brief
from longvila_jax.core.safe_paths import resolve_inside
from longvila_jax.data.image import load_image
from longvila_jax.data.sandbox import DecodeSandbox
from longvila_jax.data.skips import SampleSkipped
from longvila_jax.infer.release import ReleaseConfig
from longvila_jax.serve.errors import APIError, bad_request
from longvila_jax.serve.limits import Limits
from longvila_jax.serve.request import Media

CHILD = "longvila_jax.serve.decode_child"


class MediaDecoder:
    """Turns a request's :class:`~longvila_jax.serve.request.Media` into uint8 frames.

    Args:
      image_size: the vision tower's input side.
      limits: the server's limits (media bytes, frames, decode timeout, decoder count).
      release: the checkpoint's upstream settings (``infer.release``), or None.
      media_root: the folder video paths are resolved under, or None (paths refused).

    Thread-safe: each call borrows one of ``limits.decode_workers`` sandboxes.
    """

    def __init__(
        self,
        image_size: int,
        limits: Limits,
        release: ReleaseConfig | None = None,
        media_root: str | os.PathLike | None = None,
    ):
        self.size, self.limits, self.release = image_size, limits, release
        self.media_root = Path(media_root).resolve() if media_root is not None else None
        self.tmp = Path(tempfile.mkdtemp(prefix="longvila-serve-"))  # mode 0700
        self._pool: queue.Queue[DecodeSandbox] = queue.Queue()
        for _ in range(limits.decode_workers):
            self._pool.put(DecodeSandbox(limits.decode_timeout_s, module=CHILD))

    def close(self) -> None:
        """Kills the decoder children and removes the temporary folder."""
        while not self._pool.empty():
            self._pool.get_nowait().kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def video_args(self, frames: int | None, fps: float | None) -> dict:
        """The decode request of ``infer.Generator.load_frames`` for these settings."""
        if self.release is not None:
            n = frames or self.release.num_video_frames or 8
            return {
                "rule": "inference",
                "num_frames": n,
                "fps": self.release.fps if fps is None else fps,
            }
        return {"rule": "training", "num_frames": frames or 8, "fps": fps or 0.0}

    def frames(self, media: Sequence[Media], frames: int | None, fps: float | None) -> np.ndarray:
        """All frames of a request, media in order: uint8 [n, S, S, 3] (n may be 0).

        Raises:
          APIError: 400 naming the media part (undecodable, too large, outside the root,
            too many frames).
        """
        out = [self._one(m, frames, fps) for m in media]
        total = sum(len(f) for f in out)
        if total > self.limits.max_frames:
            raise bad_request(
                "frames",
                f"the media give {total} frames > --max-frames {self.limits.max_frames}",
                "too_many_frames",
            )
        if not out:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.concatenate(out)

    def _one(self, media: Media, frames: int | None, fps: float | None) -> np.ndarray:
        if media.data is not None:
            if len(media.data) > self.limits.max_media_bytes:
                raise bad_request(
                    media.field,
                    f"{len(media.data)} bytes > --max-media-bytes {self.limits.max_media_bytes}",
                    "media_too_large",
                )
            fd, name = tempfile.mkstemp(dir=self.tmp)  # 0600, random name
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(media.data)
                return self._decode(media, Path(name), frames, fps)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name)
        path = self._resolve(media)
        return self._decode(media, path, frames, fps)

    def _resolve(self, media: Media) -> Path:
        assert self.media_root is not None  # serve.request refuses paths without a root
        rel = media.path
        if os.path.isabs(rel):  # an absolute path is accepted when it lies under the root
            try:
                rel = os.path.relpath(os.path.normpath(rel), self.media_root)
            except ValueError:
                rel = media.path
        try:
            path = resolve_inside(self.media_root, rel, media.field, InputError)
        except InputError:
            raise bad_request(
                media.field,
                f"{brief(media.path)} is not a path under the media root",
                "path_outside_root",
            ) from None
        try:
            size = path.stat().st_size
        except OSError:
            raise bad_request(
                media.field, f"{brief(media.path)} does not exist", "missing_file"
            ) from None
        if size > self.limits.max_media_bytes:
            raise bad_request(
                media.field,
                f"{size} bytes > --max-media-bytes {self.limits.max_media_bytes}",
                "media_too_large",
            )
        return path

    def _decode(self, media: Media, path: Path, frames: int | None, fps: float | None):
        try:
            if media.kind == "image":
                return load_image(path, self.size)[None]
            sandbox = self._pool.get()
            try:
                request = self.video_args(frames, fps)
                return sandbox.decode(path=str(path), size=self.size, **request)
            finally:
                self._pool.put(sandbox)
        except SampleSkipped as e:
            # The detail names the temporary file; the client knows its part by the field.
            detail = e.detail.replace(str(path), "the " + media.kind)
            raise bad_request(
                media.field,
                f"the {media.kind} cannot be decoded ({e.reason}: {brief(detail)})",
                f"invalid_{media.kind}",
            ) from None
        except RuntimeError as e:  # the sandbox could not start: the server's fault
            raise APIError(
                503, f"the video decoder is unavailable: {e}", None, "decoder_unavailable"
            ) from None


__all__ = ["MediaDecoder"]
