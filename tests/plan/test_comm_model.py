"""The planner's collective volumes are the analytic volumes ``bench/comm_bytes.py`` checks
against compiled HLO: the bench imports them from ``plan.comm`` (one source), and a small MM-SP
attention compiled on 8 simulated CPU devices moves the bytes ``plan.comm.attention_bytes``
predicts (forward and forward + backward; the int32 segment ids and positions that travel with
the blocks are the only bytes the formulas leave out)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.ulysses import kv_replication
from longvila_jax.plan import comm

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import comm_bytes  # noqa: E402


@pytest.mark.parametrize("ring, ulysses", [(8, 1), (1, 8), (2, 4), (4, 2)])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_bench_uses_the_planner_formulas(ring, ulysses, kv_heads):
    for e in (2, 4):
        ana = comm.attention_bytes(3, 4096, 8, kv_heads, 64, ring, ulysses, e)
        bench = comm_bytes.analytic_bytes(3, 4096, 8, kv_heads, 64, ring, ulysses, e)
        assert bench == {"fwd": ana["fwd"], "fwd_bwd": ana["fwd_bwd"]}
        assert ana["fwd"] == pytest.approx(ana["ulysses_fwd"] + ana["ring_fwd"])
        assert ana["fwd_bwd"] == pytest.approx(
            2 * ana["ulysses_fwd"] + ana["ring_fwd"] + ana["ring_bwd"]
        )


def test_ring_hop_bytes_sum_to_the_ring_volume():
    # R - 1 forward hops and, backward, R - 1 KV hops plus R dK/dV hops.
    for ring, uly in ((4, 2), (8, 1), (2, 4)):
        a = comm.attention_bytes(1, 8192, 8, 2, 64, ring, uly, 2)
        kv_dim = 2 * kv_replication(8, 2, uly) * 64  # U = 4 replicates the 2 KV heads
        fwd, bwd = comm.ring_hop_bytes(1, 8192, kv_dim, ring, uly, 2, 4)
        assert (ring - 1) * fwd == pytest.approx(a["ring_fwd"])
        kv_only = fwd
        assert (ring - 1) * kv_only + ring * (bwd - kv_only) == pytest.approx(a["ring_bwd"])


@pytest.mark.parametrize("ring, ulysses", [(4, 2)])
def test_compiled_attention_moves_the_predicted_bytes(ring, ulysses):
    seq, heads, kv_heads, dim = 1024, 8, 2, 32
    mesh = make_mesh(MeshConfig(ring=ring, ulysses=ulysses), jax.devices()[:8])
    ana = comm.attention_bytes(1, seq, heads, kv_heads, dim, ring, ulysses, 4)
    for mode, grad in (("fwd", False), ("fwd_bwd", True)):
        compiled = comm_bytes.compiled_mmsp(
            mesh, 1, seq, heads, kv_heads, dim, jnp.float32, None, grad
        )
        coll = comm_bytes.hlo_collectives(compiled.as_text())
        wire = sum(v["wire_bytes"] for v in coll.values())
        # Metadata (int32 ids and positions, 8 bytes a token) is the only unmodelled traffic.
        assert wire == pytest.approx(ana[mode], rel=0.03), (mode, wire, ana[mode], coll)
