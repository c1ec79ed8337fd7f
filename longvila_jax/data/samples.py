"""Per-sample transform: a raw manifest record -> tokens, supervision mask and frames, or a skip.

Runs inside grain (in the main process or a worker process). Four kinds, following longvila.md §7:

- ``video``: VILA/LLaVA records with ``video`` / ``video_path`` / ``video_id`` (``<id>.mp4``), a
  single human/gpt turn (only the first pair is used, as upstream), or ``captions`` (last caption,
  fixed question), or ``q`` / ``a``; optional ``fps`` and ``frame_count`` hints. The prompt becomes
  ``"<image>\\n" * n_frames + question``.
- ``image``: ``image`` (one path or a list) with multi-turn ``conversations`` or ``caption(s)``;
  ``<image>`` placeholders in the human turns must match the images (none: prepended).
- ``interleaved``: ``text`` with ``<image>`` placeholders and an ``images`` list; every text token
  is supervised.
- ``text``: pre-tokenised fixed-length ``text`` (or ``input_ids``) lists; labels = inputs.
- ``coyo``: stage-2 image-caption pairs in upstream's ``LazyCoyoDataset`` form: a record has
  ``image`` (a path under the media root; upstream's pickle shards hold base64 bytes, convert
  them to files) and ``text`` or ``caption``; it becomes ``"<image>\n{caption}<eos>"`` with no
  chat template and no question, every text token supervised except pad ids
  (``text.encode_caption``). One source element is a group of ``DatasetSpec.records_per_item``
  consecutive records (4, as upstream): the sample then holds every caption of the group and a
  ``parts`` array of their token counts, and packing gives each caption its own segment (own
  positions, own attention, as upstream's separate sequences) in the same row. A bad record
  skips its whole group.

Bad samples become ``skips.skip_marker`` dicts; nothing is ever substituted. Each record is
isolated: besides the named ``SampleSkipped`` reasons, any other ``Exception`` raised while
turning one record into a sample (a tokenizer ``TypeError``, a numpy ``OverflowError``...) is a
skip with reason ``error:<Type>``. Not isolated: ``TooLongSample`` (``too_long_policy: error``
asks for it to stop the run), ``MemoryError`` (the host is out of memory: skipping would drop
good samples while memory lasts and hide the cause; the run must stop), and ``BaseException``s
that are not ``Exception``s (``KeyboardInterrupt``, ``SystemExit``). With ``fail_fast`` every
skip raises ``SampleError`` instead, chaining the original exception.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from longvila_jax.config.data import DataConfig
from longvila_jax.core.errors import ConfigError, brief
from longvila_jax.data import image as image_lib
from longvila_jax.data import text as text_lib
from longvila_jax.data.sandbox import DecodeSandbox
from longvila_jax.data.skips import (
    SampleError,
    SampleSkipped,
    TooLongSample,
    error_reason,
    skip_marker,
)
from longvila_jax.data.sources import parse_record, resolve_media
from longvila_jax.data.video import decode_video

CAPTION_QUESTION = "Elaborate on the visual and narrative elements of the video in detail."
IMAGE_CAPTION_QUESTION = "Describe the image briefly."
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Global sample index = dataset number << 40 | record index (fits int64 with room to spare).
INDEX_BITS = 40
# A record's own ``id`` names the sample in logs and reports only if it is this short.
MAX_ID_CHARS = 128
# Manifest frame counts beyond this are not a video's (and overflow C integers downstream).
MAX_FRAME_COUNT = 2**31 - 1
log = logging.getLogger(__name__)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SampleSkipped("bad_record", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise SampleSkipped("empty_text", f"{what} is empty")
    return value


def _messages(conv: Any) -> list[dict[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise SampleSkipped("bad_record", "conversations must be a non-empty list")
    out = []
    for k, turn in enumerate(conv):
        role = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in _ROLES:  # a list is unhashable: check type
            raise SampleSkipped("bad_record", f"conversations[{k}] needs from: human|gpt")
        out.append({"role": _ROLES[role], "content": _text(turn.get("value"), "turn")})
    return out


def _sample_id(dataset: str, rec: dict[str, Any], default: str) -> str:
    """``dataset:<record id>`` when the record has a short string or int id, else ``default``."""
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return default
    text = str(rid) if isinstance(rid, str) or abs(rid) < 10**MAX_ID_CHARS else ""
    return f"{dataset}:{text}" if 0 < len(text) <= MAX_ID_CHARS else default


class SampleProcessor:
    """Callable for ``MapDataset.map``: source element -> sample dict or skip marker.

    A sample dict holds ``input_ids`` int32 [n], ``supervised`` bool [n], ``frames`` uint8
    [f, S, S, 3], ``sample_id`` (str) and ``sample_index`` (int); a grouped (``coyo``) sample
    also ``parts`` int32 [g], the token count of each record, whose sample indices are
    ``sample_index + j``. Tokenizer and decode sandbox are
    created lazily per thread, so the processor pickles cheaply into grain workers.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.specs = {d.name: (i, d) for i, d in enumerate(cfg.datasets)}
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])

    @property
    def tokenizer(self):
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = text_lib.load_tokenizer(self.root / self.cfg.tokenizer_dir)
        return tok

    def _sandbox(self) -> DecodeSandbox:
        sb = getattr(self._local, "sandbox", None)
        if sb is None:
            sb = self._local.sandbox = DecodeSandbox(self.cfg.decode_timeout_s)
        return sb

    def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
        """One source element -> a sample dict or a skip marker.

        Raises:
          SampleError: ``fail_fast`` is set and the sample is bad (names the sample id).
          TooLongSample: ``too_long_policy`` is ``error`` and the sample is too long.
          MemoryError: the host ran out of memory (see the module docstring).
        """
        number, spec = self.specs[element["dataset"]]
        sample_id = f"{spec.name}:{element['index']}"
        # Outside the isolation below: an unusable tokenizer is a config error, not a bad sample.
        tok = self.tokenizer
        if spec.kind == "coyo" and tok.eos_token is None:
            raise ConfigError("tokenizer_dir", f"dataset {spec.name!r} (coyo) needs an EOS token")
        parts = None
        try:
            media_root = self.root / spec.media_root
            if spec.kind == "coyo":
                ids, sup, frames, parts = self._group_coyo(element, media_root)
            else:
                rec = parse_record(element)
                sample_id = _sample_id(spec.name, rec, sample_id)
                process = getattr(self, f"_kind_{spec.kind}")
                ids, sup, frames = process(rec, media_root)
            self._check(ids, sup, frames, sample_id)
        except SampleSkipped as e:
            return self._skip(e.reason, sample_id, e.detail, e)
        except TooLongSample as e:
            if str(e).startswith("sample "):
                raise
            raise TooLongSample(f"sample {sample_id}: {e}") from None
        except MemoryError:
            raise
        except Exception as e:  # one hostile record must cost one sample, not the run
            log.debug("sample %s raised", sample_id, exc_info=True)
            return self._skip(error_reason(e), sample_id, brief(e), e)
        out = {
            "input_ids": ids,
            "supervised": sup,
            "frames": frames,
            "sample_id": sample_id,
            "sample_index": (number << INDEX_BITS) | int(element["index"]),
        }
        if parts is not None:
            out["parts"] = parts
        return out

    def _skip(self, reason: str, sample_id: str, detail: str, cause: Exception) -> dict[str, Any]:
        """The skip marker, or under ``fail_fast`` a ``SampleError`` chaining ``cause``."""
        if self.cfg.fail_fast:
            raise SampleError(sample_id, reason, detail) from cause
        return skip_marker(reason, sample_id, detail)

    def _check(self, ids: np.ndarray, sup: np.ndarray, frames: np.ndarray, sample_id: str):
        cfg = self.cfg
        n_media = int(np.sum(ids == text_lib.image_token_id(self.tokenizer)))
        if n_media != len(frames):
            raise SampleSkipped(
                "placeholder_mismatch", f"{n_media} <image> vs {len(frames)} frames"
            )
        expanded = len(ids) + len(frames) * (cfg.tokens_per_frame - 1)
        if (
            expanded > cfg.row_length
            or len(ids) > cfg.text_length
            or len(frames) > cfg.max_frames_per_row
        ):
            msg = (
                f"{expanded} expanded tokens (row {cfg.row_length}), {len(ids)} text tokens "
                f"(max {cfg.text_length}), {len(frames)} frames (max {cfg.max_frames_per_row})"
            )
            if cfg.too_long_policy == "error":
                raise TooLongSample(f"sample {sample_id}: {msg}")
            raise SampleSkipped("too_long", msg)
        # Token 0 can never be a target (labels are shifted), so it does not count.
        if not sup[1:].any():
            raise SampleSkipped("no_supervised_tokens", "no assistant or text token to train on")

    def _encode(self, messages: list[dict[str, str]]) -> text_lib.Encoded:
        return text_lib.encode_conversation(
            self.tokenizer, messages, self.cfg.template, self.cfg.system_prompt
        )

    def _kind_video(self, rec: dict[str, Any], media_root: Path):
        cfg = self.cfg
        rel = rec.get("video", rec.get("video_path"))
        if rel is None and isinstance(rec.get("video_id"), str):
            rel = rec["video_id"] if Path(rec["video_id"]).suffix else rec["video_id"] + ".mp4"
        if "conversations" in rec:
            msgs = _messages(rec["conversations"])
            if len(msgs) < 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
                raise SampleSkipped("no_supervised_tokens", "video needs a human turn then gpt")
            question, answer = msgs[0]["content"], msgs[1]["content"]
        elif "captions" in rec:
            caps = rec["captions"]
            answer = _text(caps[-1] if isinstance(caps, list) and caps else caps, "caption")
            question = CAPTION_QUESTION
        elif "q" in rec and "a" in rec:
            question, answer = _text(rec["q"], "q"), _text(rec["a"], "a")
        else:
            raise SampleSkipped("bad_record", "video record needs conversations, captions or q/a")
        path = resolve_media(media_root, rel)
        fps, count = rec.get("fps"), rec.get("frame_count")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))):
            raise SampleSkipped("bad_record", f"fps must be a number, got {brief(fps)}")
        try:
            fps = None if fps is None else float(fps)
        except OverflowError:  # an int beyond float range
            raise SampleSkipped("bad_fps", f"fps {brief(fps)}") from None
        if count is not None and (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 <= count <= MAX_FRAME_COUNT
        ):
            raise SampleSkipped(
                "bad_record", f"frame_count must be an int in [0, 2^31), got {brief(count)}"
            )
        request = {
            "path": str(path),
            "size": cfg.image_size,
            "num_frames": cfg.num_video_frames,
            "max_fps": cfg.max_fps,
            "min_frames": cfg.min_video_frames,
            "seek_gap_frames": cfg.seek_gap_frames,
            "fps_hint": fps,
            "frame_count_hint": count or None,
        }
        if cfg.decode_timeout_s > 0:
            frames = self._sandbox().decode(**request)
        else:
            frames = decode_video(**request)
        prompt = text_lib.media_prompt(question, len(frames))
        enc = self._encode(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        )
        return enc.input_ids, enc.supervised, frames

    def _load_images(self, paths: Any, media_root: Path) -> np.ndarray:
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths:
            raise SampleSkipped("bad_record", "images must be a path or a non-empty list")
        if len(paths) > self.cfg.max_frames_per_row:
            # Before any decoding: a record listing 100k images must not decode them all first.
            msg = f"{len(paths)} images (max {self.cfg.max_frames_per_row} frames per row)"
            if self.cfg.too_long_policy == "error":
                raise TooLongSample(msg)
            raise SampleSkipped("too_long", msg)
        px = self.cfg.max_image_pixels
        imgs = [
            image_lib.load_image(resolve_media(media_root, p), self.cfg.image_size, px)
            for p in paths
        ]
        return np.stack(imgs)

    def _kind_image(self, rec: dict[str, Any], media_root: Path):
        if "conversations" in rec:
            msgs = _messages(rec["conversations"])
        elif "caption" in rec or "captions" in rec:
            caps = rec.get("caption", rec.get("captions"))
            caption = _text(caps[-1] if isinstance(caps, list) and caps else caps, "caption")
            msgs = [
                {"role": "user", "content": IMAGE_CAPTION_QUESTION},
                {"role": "assistant", "content": caption},
            ]
        else:
            raise SampleSkipped("bad_record", "image record needs conversations or caption(s)")
        paths = rec.get("image", rec.get("images"))
        n_paths = 1 if isinstance(paths, str) else len(paths) if isinstance(paths, list) else 0
        tag = text_lib.IMAGE_TOKEN
        n_tags = sum(m["content"].count(tag) for m in msgs if m["role"] == "user")
        if n_tags == 0 and msgs[0]["role"] == "user":
            msgs[0] = {"role": "user", "content": (tag + "\n") * n_paths + msgs[0]["content"]}
        elif n_tags != n_paths:
            raise SampleSkipped("placeholder_mismatch", f"{n_tags} {tag} vs {n_paths} images")
        frames = self._load_images(paths, media_root)
        enc = self._encode(msgs)
        return enc.input_ids, enc.supervised, frames

    def _kind_interleaved(self, rec: dict[str, Any], media_root: Path):
        doc = _text(rec.get("text"), "text")
        paths = rec.get("images", [])
        n_tags = doc.count(text_lib.IMAGE_TOKEN)
        if not isinstance(paths, list) or n_tags != len(paths):
            raise SampleSkipped(
                "placeholder_mismatch", f"{n_tags} <image> vs images {brief(paths)}"
            )
        frames = self._load_images(paths, media_root) if paths else self._no_frames()
        enc = text_lib.encode_document(self.tokenizer, doc)
        return enc.input_ids, enc.supervised, frames

    def _kind_text(self, rec: dict[str, Any], media_root: Path):
        ids = rec.get("text", rec.get("input_ids"))
        # type(t) is int: JSON true/false are not token ids (bool subclasses int).
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise SampleSkipped("bad_record", "text must be a list of token ids")
        if not ids:
            raise SampleSkipped("empty_text", "empty token list")
        vocab = len(self.tokenizer)
        # Range-check the Python ints first: numpy raises OverflowError on ids over 2^63.
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SampleSkipped("bad_record", f"token id {brief(bad)} outside [0, {vocab})")
        arr = np.asarray(ids, dtype=np.int32)
        return arr, np.ones(len(arr), dtype=bool), self._no_frames()

    def _group_coyo(self, element: dict[str, Any], media_root: Path):
        """A group of COYO records -> concatenated ids, supervision, frames and part lengths."""
        raws = element["raw"]
        ids, sups, frames = [], [], []
        for raw in raws:
            rec = parse_record({"raw": raw})
            key = "text" if "text" in rec else "caption"  # upstream's choice of caption key
            enc = text_lib.encode_caption(self.tokenizer, _text(rec.get(key), key))
            ids.append(enc.input_ids)
            sups.append(enc.supervised)
            frames.append(self._load_images(rec.get("image"), media_root))
        parts = np.asarray([len(x) for x in ids], dtype=np.int32)
        return np.concatenate(ids), np.concatenate(sups), np.concatenate(frames), parts

    def _no_frames(self) -> np.ndarray:
        s = self.cfg.image_size
        return np.zeros((0, s, s, 3), dtype=np.uint8)


__all__ = ["CAPTION_QUESTION", "INDEX_BITS", "SampleProcessor"]
