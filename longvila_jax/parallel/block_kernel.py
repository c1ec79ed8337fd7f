"""Which implementation runs the ring's attention blocks: the single place that decides.

A ring step attends one query block to one KV block (``ring_kernels``). Two implementations
honour the same contract: ``xla`` (``ring_kernels.chunked_forward`` / ``chunked_backward``,
einsums that XLA fuses; the reference and the CPU path) and ``pallas`` (``pallas_forward`` /
``pallas_backward``, fused flash-attention tiles that lower through Triton on a GPU and run in
Pallas' interpreter elsewhere). The mesh file picks one with ``block_kernel`` (``MeshConfig``);
``auto`` means pallas on a GPU backend and xla on every other one, so CPU runs are unchanged.

cuDNN is deliberately not a choice: ``jax.nn.dot_product_attention`` returns an LSE without a
gradient and its backward cannot take the ring's global LSE (docs/architecture.md, "GPU block
kernels").
"""

from __future__ import annotations

from typing import Literal

import jax

BlockKernel = Literal["auto", "xla", "pallas"]
BLOCK_KERNELS: tuple[str, ...] = ("auto", "xla", "pallas")
# ``jax.default_backend()`` names a CUDA / ROCm device "gpu"; plugin builds may say "cuda".
GPU_BACKENDS = frozenset({"gpu", "cuda", "rocm"})


def resolve_block_kernel(name: str, backend: str | None = None) -> Literal["xla", "pallas"]:
    """Resolves a ``block_kernel`` setting to the implementation that will run.

    Args:
      name: "auto", "xla" or "pallas" (``MeshConfig.block_kernel``).
      backend: the jax backend to decide for (default: ``jax.default_backend()``).

    Returns:
      "pallas" for "pallas", and for "auto" on a GPU backend; "xla" otherwise.

    Raises:
      ValueError: naming ``block_kernel`` when ``name`` is not one of ``BLOCK_KERNELS``.
    """
    if name not in BLOCK_KERNELS:
        raise ValueError(f"block_kernel: must be one of {BLOCK_KERNELS}, got {name!r}")
    if name != "auto":
        return name  # type: ignore[return-value]
    backend = jax.default_backend() if backend is None else backend
    return "pallas" if backend in GPU_BACKENDS else "xla"


def interpret_pallas(interpret: bool | None, backend: str | None = None) -> bool:
    """Whether a Pallas kernel runs in the interpreter: ``interpret`` when given, else whenever
    the backend is not a GPU (Pallas has no compiled CPU path; the interpreter runs the same
    kernel body as XLA ops, which is how the CPU tests check it)."""
    if interpret is not None:
        return interpret
    backend = jax.default_backend() if backend is None else backend
    return backend not in GPU_BACKENDS
