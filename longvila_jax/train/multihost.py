"""Multi-host start-up: ``jax.distributed.initialize`` from SLURM or explicit variables.

Explicit variables win over SLURM:

- ``LONGVILA_COORDINATOR`` (``host:port``), ``LONGVILA_NUM_PROCESSES``, ``LONGVILA_PROCESS_ID``
  and optionally ``LONGVILA_LOCAL_DEVICE_IDS`` (comma-separated);
- otherwise, under SLURM with more than one task (``SLURM_NTASKS`` > 1), JAX's own SLURM
  cluster detection (``jax.distributed.initialize()`` without arguments).

With neither, or with one process, nothing is initialised. CPU multi-process runs use gloo
collectives (``jax_cpu_collectives_implementation``), set before the backend starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job."""

    process_index: int
    process_count: int
    local_devices: int
    devices: int


def _explicit() -> dict | None:
    coord = os.environ.get("LONGVILA_COORDINATOR")
    if not coord:
        return None
    try:
        n = int(os.environ["LONGVILA_NUM_PROCESSES"])
        pid = int(os.environ["LONGVILA_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            "LONGVILA_COORDINATOR needs integer LONGVILA_NUM_PROCESSES and LONGVILA_PROCESS_ID"
        ) from e
    if not 0 <= pid < n:
        raise ValueError(f"LONGVILA_PROCESS_ID={pid} outside [0, {n})")
    kw: dict = {"coordinator_address": coord, "num_processes": n, "process_id": pid}
    ids = os.environ.get("LONGVILA_LOCAL_DEVICE_IDS")
    if ids:
        kw["local_device_ids"] = [int(i) for i in ids.split(",")]
    return kw


def initialize() -> ProcessInfo:
    """Initialises ``jax.distributed`` when the environment describes a multi-process job.

    Must run before anything touches the JAX backend. Idempotent.

    Returns:
      The process index/count and device counts.
    """
    kw = _explicit()
    if kw is not None and kw["num_processes"] > 1:
        if not jax.distributed.is_initialized():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(**kw)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return ProcessInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


__all__ = ["ProcessInfo", "initialize"]
