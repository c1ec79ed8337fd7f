"""Configuration schema (frozen dataclasses) and YAML loading with dotted overrides."""

from longvila_jax.config.base import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    save_yaml,
    to_dict,
)
from longvila_jax.config.model import (
    LLMConfig,
    ModelConfig,
    ProjectorConfig,
    RopeScaling,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "LLMConfig",
    "ModelConfig",
    "ProjectorConfig",
    "RopeScaling",
    "VisionConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_yaml",
    "save_yaml",
    "to_dict",
]
