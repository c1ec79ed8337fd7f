"""What an upstream checkpoint's top-level ``config.json`` says about inference: the named chat
template, the number of video frames and the frame rate (``num_video_frames``, ``fps``).

``config.model.ModelConfig`` holds the network only; these keys steer upstream inference
(``llava/utils/media.py::_extract_video`` and ``llava/model/language_model/builder.py`` on VILA
main) and are read here from the config the checkpoint carries: ``config.json`` (or
``config_vila_style.json``, which the importer prefers) of a VILA-layout folder, or the copy a
project checkpoint keeps under ``hf/`` (``ckpt.vila_import`` copies it verbatim; its files are
checked against the checkpoint's integrity manifest before they are read). A checkpoint with no
such file (one this project trained from scratch) has no release settings.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from longvila_jax.ckpt import integrity, orbax_io
from longvila_jax.ckpt.hf_config import read_json
from longvila_jax.core.errors import ConfigError

# The importer's preference (``ckpt.hf_config``): a LongVILA-R1 style folder keeps the VILA
# config in config_vila_style.json and a remote-code config in config.json.
_TOP_FILES = ("config_vila_style.json", "config.json")


@dataclasses.dataclass(frozen=True)
class ReleaseConfig:
    """Inference settings of an upstream checkpoint.

    Attributes:
      chat_template: the config's template name (``qwen2``), None when absent.
      num_video_frames: frames per video, None when absent.
      fps: frames per second of the inference frame rule (0: uniform over the whole video).
    """

    chat_template: str | None = None
    num_video_frames: int | None = None
    fps: float = 0.0


def _top_folder(path: Path) -> Path | None:
    if orbax_io.is_project_checkpoint(path):
        hf = path / orbax_io.HF_DIR
        if not hf.is_dir():
            return None
        integrity.verify_files(path, orbax_io.HF_DIR)
        return hf
    # A VILA layout has llm/ beside its config; a bare HF LLM folder's config.json is not one.
    return path if (path / "llm").is_dir() else None


def parse_release_config(top: dict) -> ReleaseConfig:
    """The inference settings of a top-level config dict.

    Raises:
      ConfigError: a key of the wrong type or range (named).
    """
    template = top.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ConfigError("chat_template", f"must be a template name, got {type(template)}")
    frames = top.get("num_video_frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)):
        raise ConfigError("num_video_frames", f"must be an integer, got {frames!r}")
    if frames is not None and frames < 1:
        raise ConfigError("num_video_frames", f"must be >= 1, got {frames}")
    fps = top.get("fps", 0.0)
    fps = 0.0 if fps is None else fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps):
        raise ConfigError("fps", f"must be a finite number, got {fps!r}")
    if fps < 0:
        raise ConfigError("fps", f"must be >= 0, got {fps}")
    return ReleaseConfig(template or None, frames, float(fps))


def read_release_config(path: str | Path) -> ReleaseConfig | None:
    """The release settings of a VILA-layout folder or project checkpoint; None when it
    carries no upstream top-level config.

    Raises:
      CheckpointError: a project checkpoint whose ``hf/`` files fail the integrity check.
      ConfigError: an unreadable config or a bad key (named).
    """
    folder = _top_folder(Path(path))
    if folder is None:
        return None
    for name in _TOP_FILES:
        if (folder / name).is_file():
            return parse_release_config(read_json(folder / name, name, folder))
    return None


__all__ = ["ReleaseConfig", "parse_release_config", "read_release_config"]
