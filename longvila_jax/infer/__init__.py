"""Long-video inference with multi-modal sequence parallelism (MM-SP).

Sequence-parallel prefill with the 2D (Ulysses x zigzag ring) attention, then autoregressive
decoding over a KV cache sharded along the sequence, where each device attends its local shard
and the partial outputs are merged with their log-sum-exp. ``Generator`` is the Python API
(``SamplingParams`` its settings, ``TeacherForcedScorer`` the scoring forward it shares with the
evaluations); ``python -m longvila_jax.infer`` the command line.
"""

from longvila_jax.infer.engine import TokenGenerator, TokenOutput, single_device_mesh
from longvila_jax.infer.generate import Generation, Generator
from longvila_jax.infer.sampling import GREEDY, SamplingParams
from longvila_jax.infer.scoring import TeacherForced, TeacherForcedScorer

__all__ = [
    "GREEDY",
    "Generation",
    "Generator",
    "SamplingParams",
    "TeacherForced",
    "TeacherForcedScorer",
    "TokenGenerator",
    "TokenOutput",
    "single_device_mesh",
]
