"""Long-video inference with multi-modal sequence parallelism (MM-SP).

Sequence-parallel prefill with the 2D (Ulysses x zigzag ring) attention, then autoregressive
decoding over a KV cache sharded along the sequence, where each device attends its local shard
and the partial outputs are merged with their log-sum-exp. ``Generator`` is the Python API;
``python -m longvila_jax.infer`` the command line.
"""

from longvila_jax.infer.generate import (
    Generation,
    Generator,
    TeacherForced,
    TokenOutput,
    single_device_mesh,
)

__all__ = ["Generation", "Generator", "TeacherForced", "TokenOutput", "single_device_mesh"]
