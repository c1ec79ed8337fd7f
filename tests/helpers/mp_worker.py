"""One process of the 2-process x 4-CPU-device MM-SP run (ring across processes, Ulysses
within). Usage: ``python -m helpers.mp_worker PROCESS_ID PORT OUT.npz`` with ``tests/`` on
``PYTHONPATH``. The parent sets XLA_FLAGS for 4 devices; process 0 writes the gathered outputs
and gradients."""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from helpers.mmsp_cases import fast_jit, packed_inputs  # noqa: E402
from longvila_jax.parallel.attention import make_mmsp_attention  # noqa: E402
from longvila_jax.parallel.layouts import (  # noqa: E402
    apply_layout,
    undo_layout,
    zigzag_2d_permutation,
)
from longvila_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402

B, T, H, HKV, D = 4, 64, 8, 4, 8


def run(mesh) -> dict[str, np.ndarray]:
    """Forward and (dq, dk, dv) of sum(out * ct), natural order, on any (2, 4) mesh."""
    x = packed_inputs(B, T, H, HKV, D, seed=1)
    ct = np.random.default_rng(7).standard_normal((B, T, H, D), dtype=np.float32)
    perm = zigzag_2d_permutation(T, 2, 4)
    attn = make_mmsp_attention(mesh)
    rep = NamedSharding(mesh, P())
    args = [
        jax.make_array_from_callback(a.shape, rep, lambda idx, a=a: a[idx])
        for a in (x["q"], x["k"], x["v"], x["segment_ids"], x["positions"], ct)
    ]

    def loss(q, k, v, seg, pos, ct):
        lay = lambda a: apply_layout(a, perm)  # noqa: E731
        out = attn(
            lay(q), lay(k), lay(v), segment_ids=lay(seg), positions=lay(pos),
            causal=True, scale=D**-0.5,
        )  # fmt: skip
        out = undo_layout(out, perm)
        return jnp.sum(out * ct), out

    grads, out = fast_jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    names = ("out", "dq", "dk", "dv")
    return {
        n: np.asarray(multihost_utils.process_allgather(a, tiled=True))
        for n, a in zip(names, (out, *grads), strict=True)
    }


def main() -> None:
    pid, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh(MeshConfig(ring=2, ulysses=4))
    # Ulysses groups are process-local; the ring spans the two processes.
    for r in range(2):
        assert {d.process_index for d in mesh.devices[0, 0, r]} == {r}
    res = run(mesh)
    if pid == 0:
        np.savez(out_path, **res)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
