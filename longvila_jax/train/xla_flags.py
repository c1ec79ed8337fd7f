"""XLA flags the trainer adds on GPU so the ring's collectives overlap the block compute.

The ring attention (``parallel.ring``) sends the next KV block with a ``collective-permute``
before it computes the current one, and Ulysses moves heads with ``all-to-all``; both can only
run under the compute if XLA's scheduler is allowed to move the collective's start early and
its done late. On GPU that is the latency-hiding scheduler, which XLA leaves off by default
(``--xla_gpu_enable_latency_hiding_scheduler``; NVIDIA's JAX images turn it on, see the JAX
"GPU performance tips" and NVIDIA JAX-Toolbox "GPU performance" pages). Asynchronous collectives
themselves are XLA's default, so nothing else is needed for the overlap.

Flags deliberately left out:

- ``--xla_gpu_enable_while_loop_double_buffering``: the ring already issues step i+1's send
  before step i's compute, and double buffering would apply to every while loop, the scanned
  layer stack included, doubling its carried buffers: the memory long rows need;
- ``--xla_gpu_enable_triton_gemm=false``, command buffers, combine thresholds: code generation
  and collective combining, not overlap; a user who wants them sets them.

XLA aborts the process on a flag name it does not know, so the list stays short and every
name is checked against the installed jaxlib by tests/train/test_xla_flags.py.

The flags must be in ``XLA_FLAGS`` before the JAX backend initialises, so the platform is decided
without importing jax: ``JAX_PLATFORMS`` when set (its first entry is the platform jax will
use), else whether a CUDA plugin for jax is installed (jax then picks the GPU). A user's own
setting of a flag always wins, and nothing changes on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, MutableMapping

# (flag, value) pairs added on GPU, in this order.
GPU_FLAGS: tuple[tuple[str, str], ...] = (("xla_gpu_enable_latency_hiding_scheduler", "true"),)

# Modules whose presence means jax has a CUDA backend (jax 0.4.x onward ships CUDA as a PJRT
# plugin: ``jax[cuda12]`` / ``jax[cuda13]`` install these).
CUDA_PLUGIN_MODULES = (
    "jax_cuda13_plugin",
    "jax_cuda12_plugin",
    "jax_plugins.xla_cuda13",
    "jax_plugins.xla_cuda12",
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken one
        return False


def target_platform(environ: Mapping[str, str] | None = None) -> str:
    """The platform jax will run on, decided without importing or initialising jax.

    Args:
      environ: the environment (default ``os.environ``).

    Returns:
      "gpu" for CUDA, else the lower-cased first entry of ``JAX_PLATFORMS`` ("cpu", "tpu",
      "rocm"...), or "cpu" when it is unset and no CUDA plugin is installed.
    """
    env = os.environ if environ is None else environ
    platforms = (env.get("JAX_PLATFORMS") or "").strip()
    if platforms:
        first = platforms.split(",")[0].strip().lower()
        return "gpu" if first in ("cuda", "gpu") else first
    return "gpu" if any(_installed(m) for m in CUDA_PLUGIN_MODULES) else "cpu"


def _flag_names(flags: str) -> set[str]:
    """Names of the flags in an ``XLA_FLAGS`` string (``--name=value`` or bare ``--name``)."""
    names = set()
    for token in flags.split():
        if token.startswith("--"):
            names.add(token[2:].split("=", 1)[0])
    return names


def with_gpu_flags(flags: str, platform: str) -> str:
    """The ``XLA_FLAGS`` string to use: ``flags`` plus the :data:`GPU_FLAGS` it does not set.

    Pure: the caller reads and writes the environment.

    Args:
      flags: the current ``XLA_FLAGS`` value ("" when unset).
      platform: ``target_platform()``'s answer; anything but "gpu" returns ``flags`` unchanged.

    Returns:
      ``flags`` with each missing GPU flag appended as ``--name=value``; a flag the user already
      set (to any value) is left as it is.
    """
    if platform != "gpu":
        return flags
    have = _flag_names(flags)
    extra = [f"--{name}={value}" for name, value in GPU_FLAGS if name not in have]
    return " ".join([flags.strip(), *extra]).strip() if extra else flags


def apply_gpu_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds the GPU flags to ``environ["XLA_FLAGS"]`` when jax will run on a GPU.

    Call it before anything initialises the JAX backend (the train CLI does it first thing).

    Args:
      environ: the environment to update (default ``os.environ``).

    Returns:
      The flags added (empty on CPU or when the user set them all).
    """
    env = os.environ if environ is None else environ
    old = env.get("XLA_FLAGS", "")
    new = with_gpu_flags(old, target_platform(env))
    if new == old:
        return []
    env["XLA_FLAGS"] = new
    return sorted(_flag_names(new) - _flag_names(old))


__all__ = [
    "CUDA_PLUGIN_MODULES",
    "GPU_FLAGS",
    "apply_gpu_flags",
    "target_platform",
    "with_gpu_flags",
]
