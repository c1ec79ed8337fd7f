"""The compiler as witness: the real MM-SP train step lowered and compiled for abstract inputs.

The planner's memory model (``plan.memory``) is checked against what XLA reserves for the step
the trainer runs: ``train.step.make_train_step`` over ``train.state.create_state`` with the
stage's dtype policy, an ``MMSPPlan`` objective (frames sharded for the tower, 2D attention for
the LLM), jitted with the trainer's shardings and donation (``train.step.jit_step``). Every
argument is a ``jax.ShapeDtypeStruct`` carrying its sharding, so nothing is allocated; only
``lower().compile()`` runs. Used by ``tests/plan/test_memory_model.py`` (tiny dims, 8 simulated
CPU devices) and ``bench/scale_witness.py`` (scaled-down Qwen2-7B on 256 simulated devices).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from longvila_jax.config.model import ModelConfig
from longvila_jax.config.train import OptimConfig, PrecisionConfig
from longvila_jax.parallel.mesh import MeshConfig, make_mesh
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.parallel.mmsp_routing import RoutingGeometry
from longvila_jax.train.optim import make_optimizer, make_schedule
from longvila_jax.train.precision import DtypePolicy, forward_config
from longvila_jax.train.state import ModelTemplate, create_state, state_shardings
from longvila_jax.train.step import jit_step, make_train_step

# The image token id never reaches the device (text ids hold 0 at visual slots).
_IMAGE_TOKEN = 0


def abstract_batch(plan: MMSPPlan, rows: int, frames: int, image_size: int) -> dict[str, Any]:
    """ShapeDtypeStructs of one global batch as ``MMSPPlan.host_arrays`` lays it out.

    Args:
      plan: the MM-SP plan (mesh, seq_len, frame slots, grad_accum).
      rows: global rows per micro-batch (a multiple of the batch groups).
      frames: frame slots per row (0: text only).
      image_size: frame side in pixels.

    Returns:
      name -> ShapeDtypeStruct [A, ...] with the plan's shardings.
    """
    shardings = plan.shardings()
    a, length = plan.grad_accum, plan.seq_len
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        k: ((a, rows, length), jnp.int32)
        for k in ("text_ids", "positions", "segment_ids", "labels")
    }
    if frames:
        geo = RoutingGeometry(
            rows, plan.batch_groups, length, plan.sp, frames, plan.tokens_per_frame
        )
        g, sp = plan.batch_groups, plan.sp
        shapes["recv"] = ((a, rows, length), jnp.int32)
        slots = sp * geo.frames_per_device
        shapes["frames"] = ((a, rows, slots, image_size, image_size, 3), jnp.float32)
        shapes["send1"] = ((a, g, sp, sp, geo.hop1_capacity), jnp.int32)
        shapes["send2"] = ((a, g, sp, sp, geo.hop2_capacity), jnp.int32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def compile_step(
    model: ModelConfig,
    mesh_cfg: MeshConfig,
    *,
    seq_len: int,
    frames: int,
    rows: int = 1,
    grad_accum: int = 1,
    precision: PrecisionConfig | None = None,
    trainable: str = ".*",
    devices: list | None = None,
    kv_chunk: int | None = 512,
) -> Any:
    """Lowers and compiles the trainer's MM-SP step for abstract state and batch.

    Args:
      model: the model config (its ``remat`` is the policy compiled).
      mesh_cfg: the mesh (sizes fixed or one -1 filled from ``devices``).
      seq_len: packed row length L; frames: frame slots per row.
      rows: global rows per micro-batch; grad_accum: micro-batches per step.
      precision: the stage's dtype policy (default: fp32 masters, the model's compute dtype).
      trainable: regex of the trainable parameter paths (".*": everything trains).
      devices: the devices of the mesh (default all).
      kv_chunk: the ring's KV chunk inside a block (``make_mmsp_attention``).

    Returns:
      The compiled executable (``memory_analysis()``, ``as_text()``).
    """
    import re

    mesh: Mesh = make_mesh(mesh_cfg, devices)
    policy = DtypePolicy.of(precision or PrecisionConfig(), model)
    template = ModelTemplate.build(forward_config(model, policy))
    stored = ModelTemplate.build(model)
    rx = re.compile(trainable)
    train_set = {n for n in stored.names if rx.fullmatch(n)}
    optim = OptimConfig(lr=1e-4, warmup_steps=0, grad_accum=grad_accum)
    optimizer = make_optimizer(optim, 10)
    param_sh = stored.shardings(mesh, mesh_cfg.param_rules)

    def build(params):
        return create_state(params, train_set, optimizer, policy=policy)

    abstract_state = jax.eval_shape(build, dict(stored.shapes))
    state_sh = state_shardings(abstract_state, param_sh, mesh, optimizer)
    state_args = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh
    )
    objective = MMSPPlan(
        mesh,
        seq_len=seq_len,
        frame_slots=frames,
        tokens_per_frame=model.tokens_per_frame,
        image_token_id=_IMAGE_TOKEN,
        batch_axes=tuple(mesh_cfg.activation_rules.get("batch", ())),
        grad_accum=grad_accum,
        kv_chunk=kv_chunk,
        block_kernel="xla",
    )
    batch = abstract_batch(objective, rows, frames, model.vision.image_size)
    batch_sh: dict[str, NamedSharding] = {k: v.sharding for k, v in batch.items()}
    step = make_train_step(template, objective, optimizer, make_schedule(optim, 10))
    jitted = jit_step(step, state_sh, batch_sh, mesh)
    return jitted.lower(state_args, batch).compile()


def compiled_bytes(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step: arguments, outputs, aliased, temporaries, and
    ``total`` = argument + temp (the donated state's outputs alias its arguments)."""
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    out["total"] = out["argument"] + out["temp"]
    return out


def scaled_model(model: ModelConfig, *, layers: int | None = None, **remat: Any) -> ModelConfig:
    """``model`` with fewer LLM layers (and vision layers scaled alike) or another remat.

    The witness compiles scaled-down steps of a real model; layers are the cheapest dimension
    to cut because every layer of the scan has the same shapes.
    """
    if layers is None:
        return dataclasses.replace(model, **remat)
    llm = dataclasses.replace(model.llm, num_hidden_layers=layers)
    keep = max(2, math.ceil(model.vision.num_hidden_layers * layers / model.llm.num_hidden_layers))
    vision = dataclasses.replace(model.vision, num_hidden_layers=keep)
    return dataclasses.replace(model, llm=llm, vision=vision, **remat)


__all__ = ["abstract_batch", "compile_step", "compiled_bytes", "scaled_model"]
