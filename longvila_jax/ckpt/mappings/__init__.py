"""Declarative HF-name <-> parameter-path tables, one module per checkpoint component.

A :class:`Rule` pairs an HF tensor-name template with a path in
``nnx.to_pure_dict(nnx.state(component))`` and the name of a bitwise-invertible layout
transform. ``{layer}`` in a template marks a stacked layer: the tensor fills one slice of the
leading ``LAYERS`` axis. ``longvila_jax.ckpt.mapping`` compiles the templates to regexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rule:
    """One HF tensor (or one per layer) <-> one parameter leaf.

    Attributes:
      template: HF name, with ``{layer}`` standing for the layer index of stacked layers.
      path: parameter path inside the component module's pure dict.
      transform: layout transform name (see ``longvila_jax.ckpt.mapping.TRANSFORMS``).
      if_absent: what a matching tensor is when the configured model has no such parameter
        (a bias that is switched off, the head of a tied model): ``"unknown"`` (an error for
        the caller) or ``"unused"`` (harmless, kept verbatim by the converter).
    """

    template: str
    path: tuple[str, ...]
    transform: str = "identity"
    if_absent: Literal["unknown", "unused"] = "unknown"

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.template
