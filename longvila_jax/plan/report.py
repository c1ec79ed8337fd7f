"""The planner's outputs: the ranked table, the JSON record and the mesh YAML of a choice.

The mesh YAML has exactly the schema of ``configs/mesh/*.yaml`` (``parallel.mesh.MeshConfig``:
the four axis sizes, ``block_size``, ``activation_rules`` and ``param_rules``), so
``load_mesh_config`` reads it back and the trainer runs it (``--mesh FILE``). A header comment
records what the planner predicted and for what.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from longvila_jax.plan.hardware import GIB, Cluster
from longvila_jax.plan.search import Prediction
from longvila_jax.plan.workload import Workload


def mesh_dict(p: Prediction) -> dict[str, Any]:
    """The mesh file's contents for a prediction's candidate."""
    cfg = p.candidate.mesh_config()
    return {
        "data": cfg.data,
        "fsdp": cfg.fsdp,
        "ring": cfg.ring,
        "ulysses": cfg.ulysses,
        "block_size": cfg.block_size,
        "activation_rules": {k: list(v) for k, v in cfg.activation_rules.items()},
        "param_rules": {k: list(v) for k, v in cfg.param_rules.items()},
    }


def mesh_yaml(p: Prediction, work: Workload, cluster: Cluster) -> str:
    """YAML text of the mesh file, with a comment header (the choice and its predictions)."""
    c = p.candidate
    head = [
        f"# Written by python -m longvila_jax.plan for {work.name}: seq_len {work.seq_len}, "
        f"{work.frames} frame slots, {cluster.nodes} x {cluster.devices_per_node} devices.",
        f"# Predicted: {p.memory['total'] / GIB:.1f} GiB per device, step "
        f"{p.time.get('step', 0):.3g} s, {p.tokens_per_s:,.0f} tokens/s; stage remat "
        f"{c.remat}, {c.micro_rows} row(s) per group per micro-batch (grad_accum "
        f"{p.grad_accum}).",
    ]
    body = yaml.safe_dump(mesh_dict(p), sort_keys=False, default_flow_style=None)
    return "\n".join(head) + "\n" + body


def write_mesh(path: str | Path, p: Prediction, work: Workload, cluster: Cluster) -> Path:
    """Writes :func:`mesh_yaml` to ``path`` (parents created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(mesh_yaml(p, work, cluster))
    return out


def to_json(predictions: list[Prediction], work: Workload, cluster: Cluster) -> dict[str, Any]:
    """Every prediction as a JSON-ready record, with the inputs."""
    valid = [p for p in predictions if p.valid]
    return {
        "workload": {
            "name": work.name,
            "seq_len": work.seq_len,
            "frames": work.frames,
            "global_rows": work.global_rows,
            "compute_dtype": work.policy.compute,
        },
        "cluster": {
            k: getattr(cluster, k)
            for k in (
                "nodes",
                "devices_per_node",
                "hbm_gib",
                "usable",
                "nvlink_gbps",
                "ib_gbps",
                "peak_tflops",
                "matmul_eff",
                "attention_eff",
                "hop_latency_us",
            )
        },
        "best": valid[0].row() if valid else None,
        "candidates": [p.row() for p in predictions],
    }


def table(predictions: list[Prediction], limit: int | None = 20, invalid: int = 20) -> str:
    """The ranked table: the ``limit`` best valid candidates, then up to ``invalid`` invalid
    ones with their reasons (``None`` = all)."""
    header = (
        f"{'#':>3} {'data':>4} {'fsdp':>4} {'ring':>4} {'uly':>3} {'zero':>4} "
        f"{'remat':<16} {'mb':>2} {'acc':>4} {'params':>6} {'optim':>6} {'grads':>6} "
        f"{'act':>6} {'attn':>6} {'total':>6} {'step_s':>8} {'comp_s':>8} {'a2a_s':>6} "
        f"{'ring_s':>6} {'fsdp_s':>6} {'dp_s':>6} {'tok/s':>9} {'mfu':>5}"
    )
    remat_short = {"dots_with_no_batch_dims_saveable": "dots_no_batch"}

    def line(i: int, p: Prediction) -> str:
        c, m, t = p.candidate, p.memory, p.time
        g = {k: v / GIB for k, v in m.items()}
        act = g["activations"] + g["logits"] + g["batch"]
        return (
            f"{i:>3} {c.data:>4} {c.fsdp:>4} {c.ring:>4} {c.ulysses:>3} "
            f"{'sp' if c.zero_sp else '-':>4} {remat_short.get(c.remat, c.remat):<16} "
            f"{c.micro_rows:>2} {p.grad_accum:>4} {g['params']:>6.1f} {g['optimizer']:>6.1f} "
            f"{g['gradients'] + g['gathered']:>6.1f} {act:>6.1f} {g['attention']:>6.1f} "
            f"{g['total']:>6.1f} {t.get('step', 0):>8.3g} {t.get('compute', 0):>8.3g} "
            f"{t.get('ulysses_a2a', 0):>6.2g} {t.get('ring_exposed', 0):>6.2g} "
            f"{t.get('fsdp', 0):>6.2g} {t.get('dp_allreduce', 0):>6.2g} "
            f"{p.tokens_per_s:>9.4g} {p.mfu:>5.2f}"
        )

    valid = [p for p in predictions if p.valid]
    bad = [p for p in predictions if not p.valid]
    lines = [
        "memory in GiB per device (grads = gradients + FSDP-gathered copies); times in s per"
        " optimizer step (ring_s: exposed ring time)",
        header,
    ]
    for i, p in enumerate(valid[:limit] if limit else valid, 1):
        lines.append(line(i, p))
    if not valid:
        lines.append("  (no valid candidate)")
    shown = bad[:invalid] if invalid is not None else bad
    if shown:
        lines.append(f"invalid ({len(bad)} in all, {len(shown)} shown):")
        for p in shown:
            c = p.candidate
            zero = " zero_sp" if c.zero_sp else ""
            lines.append(
                f"  data={c.data} fsdp={c.fsdp} ring={c.ring} ulysses={c.ulysses}{zero} "
                f"{c.remat} mb={c.micro_rows}: " + "; ".join(p.reasons)
            )
    return "\n".join(lines)


__all__ = ["mesh_dict", "mesh_yaml", "table", "to_json", "write_mesh"]
