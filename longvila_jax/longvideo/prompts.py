"""The data engine's prompts: versioned YAML files in ``configs/data/prompts/``.

A prompt file holds the text a backend receives (``system`` and a ``template`` with named
``{placeholders}``) and its generation settings. Its ``version`` and the SHA-256 of the file go
into the provenance of every answer made with it, and into the stage settings a rerun checks
(``longvideo.store``), so a changed prompt never silently mixes with answers of the old one.
``--prompts DIR`` points the tools at another folder of prompt files.

Files are ``caption_<v>.yaml`` (role ``captioner``) and ``writer_<v>.yaml`` (role ``writer``);
``docs/longvideo_engine.md`` describes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from pathlib import Path
from typing import Any

from longvila_jax.core.errors import ConfigError, brief
from longvila_jax.core.safe_load import parse_yaml
from longvila_jax.core.safe_paths import read_regular

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "configs" / "data" / "prompts"
FILE_PREFIX = {"captioner": "caption", "writer": "writer"}
PLACEHOLDERS = {
    "captioner": frozenset(),
    "writer": frozenset({"duration", "num_clips", "clip_lines", "max_qa"}),
}
_FIELDS = {
    "version": str,
    "role": str,
    "system": (str, type(None)),
    "template": str,
    "max_tokens": int,
    "temperature": (int, float),
    "retry_temperature": (int, float),
    "max_qa": int,
}
_REQUIRED = ("version", "role", "system", "template", "max_tokens", "temperature")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A loaded prompt file (module docstring); ``sha256`` is the file's."""

    version: str
    role: str
    system: str | None
    template: str
    max_tokens: int
    temperature: float
    retry_temperature: float
    max_qa: int
    sha256: str
    path: str

    def render(self, **values: Any) -> str:
        """The template with its placeholders filled (exactly those of its role)."""
        return self.template.format_map({k: values[k] for k in PLACEHOLDERS[self.role]})

    def provenance(self) -> dict[str, str]:
        return {"version": self.version, "sha256": self.sha256}


def prompt_file(role: str, version: str, folder: str | Path | None = None) -> Path:
    """The file of ``role``'s prompt ``version`` (``v1`` -> ``writer_v1.yaml``)."""
    if role not in FILE_PREFIX:
        raise ConfigError("role", f"no prompt files for role {brief(role)}")
    if not version.replace("-", "").replace("_", "").isalnum():
        raise ConfigError("prompt_version", f"{brief(version)} is not a plain version name")
    return Path(folder or PROMPTS_DIR) / f"{FILE_PREFIX[role]}_{version}.yaml"


def load_prompt(path: str | Path, role: str) -> Prompt:
    """Reads and checks a prompt file for ``role``.

    Raises:
      ConfigError: naming the file and the field: a missing, unknown or mistyped field, a
        role other than ``role``, a placeholder the role does not fill, a bad number.
    """
    raw = read_regular(path, "prompt file", ConfigError, max_bytes=1 << 20)
    data = parse_yaml(raw, f"prompt file {path}")
    where = f"prompt file {path}"
    if not isinstance(data, dict):
        raise ConfigError(where, "must be a mapping")
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{where}: {brief(key)}", "unknown field")
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(f"{where}: {key}", "missing")
    for key, value in data.items():
        kind = _FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{where}: {key}", f"wrong type {type(value).__name__}")
    if data["role"] != role:
        raise ConfigError(f"{where}: role", f"is {brief(data['role'])}, expected {role}")
    fields = set()
    try:
        for _, name, spec, conv in string.Formatter().parse(data["template"]):
            if name is not None:
                if spec or conv or not name.isidentifier():
                    raise ConfigError(f"{where}: template", f"bad placeholder {{{brief(name)}}}")
                fields.add(name)
    except ValueError as e:
        raise ConfigError(f"{where}: template", str(e)) from None
    if fields != PLACEHOLDERS[role]:
        want = ", ".join(sorted(PLACEHOLDERS[role])) or "none"
        raise ConfigError(
            f"{where}: template", f"placeholders {sorted(fields)} (the {role} fills: {want})"
        )
    if not 1 <= data["max_tokens"] <= 1 << 16:
        raise ConfigError(f"{where}: max_tokens", "must be in [1, 65536]")
    for key in ("temperature", "retry_temperature"):
        if key in data and not 0 <= data[key] <= 2:
            raise ConfigError(f"{where}: {key}", "must be in [0, 2]")
    max_qa = data.get("max_qa", 16)
    if not 1 <= max_qa <= 256:
        raise ConfigError(f"{where}: max_qa", "must be in [1, 256]")
    return Prompt(
        version=data["version"],
        role=role,
        system=data["system"],
        template=data["template"],
        max_tokens=data["max_tokens"],
        temperature=float(data["temperature"]),
        retry_temperature=float(data.get("retry_temperature", data["temperature"])),
        max_qa=max_qa,
        sha256=hashlib.sha256(raw).hexdigest(),
        path=str(path),
    )


__all__ = ["PROMPTS_DIR", "Prompt", "load_prompt", "prompt_file"]
