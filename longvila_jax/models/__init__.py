"""Flax NNX model: SigLIP vision tower, VILA projectors, Llama/Qwen2 LLM and the LongVILA VLM."""

from longvila_jax.core.attention import AttentionFn, dense_attention
from longvila_jax.models.llm import LLM
from longvila_jax.models.projector import Projector
from longvila_jax.models.vision import VisionTower
from longvila_jax.models.vlm import ExpandedInputs, LongVILA, expand_prompts

__all__ = [
    "LLM",
    "AttentionFn",
    "ExpandedInputs",
    "LongVILA",
    "Projector",
    "VisionTower",
    "dense_attention",
    "expand_prompts",
]
