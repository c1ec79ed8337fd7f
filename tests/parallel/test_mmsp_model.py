"""MM-SP in the full VLM equals the single-device model: loss and every parameter gradient.

For every shipped 8-device CPU mesh file (ring 2 x ulysses 4, pure Ulysses, pure ring) and one
data x fsdp x ring x ulysses = 1 x 2 x 2 x 2 mesh (FSDP-sharded parameters, two batch shards),
the sharded objective (frames split over the SP devices, vision tower local, two-hop all-to-all
re-shard, 2D attention, psum'd CE) is compared in fp32 with the plain model on one device:
dense attention on the unpermuted batch, every frame encoded, one [B, L, V] logits tensor.

The packed batch is built directly with the data pipeline's keys (``data.pipeline`` table):
videos, a text-only sample and an image sample packed per row, segment boundaries inside
shards, right padding, and a row with 3 frames for 8 SP devices (empty frame slots).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from longvila_jax.config.base import load_config
from longvila_jax.config.model import ModelConfig
from longvila_jax.core.labels import IGNORE_INDEX
from longvila_jax.core.loss import token_ce_sum
from longvila_jax.models.vlm import LongVILA
from longvila_jax.parallel.layouts import expand_packed_rows, zigzag_2d_permutation
from longvila_jax.parallel.mesh import MeshConfig, load_mesh_config, make_mesh
from longvila_jax.parallel.mmsp import MMSPPlan
from longvila_jax.parallel.mmsp_routing import RoutingGeometry, frame_owners, routing_tables
from longvila_jax.train.state import ModelTemplate, flatten_model

REPO = Path(__file__).resolve().parents[2]
IMG, NL = 3, 10  # <image> id of the tiny tokenizer; the "\n" after every frame
L, F_SLOTS = 256, 12
TOL = 1e-4
# LLVM -O0 halves XLA:CPU compile time; the HLO and its fp32 arithmetic are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_cfg() -> ModelConfig:
    # 8 query heads so pure Ulysses (U = 8) is legal; 2 KV heads exercise KV replication. A
    # width of 80 differs from every attention block size, so buffer shapes identify the
    # embedded sequence in the compiled program.
    cfg = load_config(ModelConfig, REPO / "configs/model/tiny-qwen2.yaml")
    llm = dataclasses.replace(cfg.llm, hidden_size=80, num_attention_heads=8, num_key_value_heads=2)
    return dataclasses.replace(cfg, llm=llm)


def _sample(rng, n_frames: int, n_prompt: int, n_answer: int) -> list[int]:
    """Unexpanded tokens of one sample: prompt, frames ("<image>\\n" each), prompt, answer."""
    toks = list(rng.integers(11, 500, n_prompt // 2))
    for _ in range(n_frames):
        toks += [IMG, NL]
    toks += list(rng.integers(11, 500, n_prompt - n_prompt // 2))
    return toks + list(rng.integers(11, 500, n_answer))


def packed_batch(tpf: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Pipeline-layout batch of 4 rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    rows = [
        [(6, 9, 12), (0, 20, 25), (2, 6, 9)],  # video | text-only | image-ish, boundaries mid-shard
        [(3, 30, 40)],  # 3 frames < SP = 8 devices, long padded tail
        [(4, 5, 7), (5, 10, 30)],
        [(0, 60, 70), (1, 4, 6)],
    ]
    b, t_max = len(rows), 200
    ids = np.zeros((b, t_max), np.int32)
    t2e = np.full((b, t_max), L, np.int32)
    tseg = np.zeros((b, t_max), np.int32)
    seg = np.zeros((b, L), np.int32)
    pos = np.zeros((b, L), np.int32)
    labels = np.full((b, L), IGNORE_INDEX, np.int32)
    frames = np.zeros((b, F_SLOTS, image_size, image_size, 3), np.float32)
    fmask = np.zeros((b, F_SLOTS), bool)
    fseg = np.zeros((b, F_SLOTS), np.int32)
    for r, samples in enumerate(rows):
        t = e = f = 0
        for s_id, (nf, npr, nans) in enumerate(samples, start=1):
            toks = _sample(rng, nf, npr, nans)
            width = [tpf if x == IMG else 1 for x in toks]
            start = e
            for tok, w in zip(toks, width, strict=True):
                ids[r, t], t2e[r, t], tseg[r, t] = tok, e, s_id
                if tok == IMG:
                    frames[r, f] = rng.uniform(-1, 1, frames.shape[2:])
                    fmask[r, f], fseg[r, f] = True, s_id
                    f += 1
                seg[r, e : e + w] = s_id
                t, e = t + 1, e + w
            pos[r, start:e] = np.arange(e - start)
        assert e <= L and t <= t_max
    # Globally shifted labels: labels[p] = text id at p + 1 when that token is supervised.
    text_ids, visual = expand_packed_rows(
        {"input_ids": ids, "text_to_expanded": t2e, "segment_ids": seg, "frames": frames},
        IMG,
        tpf,
    )
    for r, samples in enumerate(rows):
        sup_mask = np.zeros(L, bool)
        tt = 0
        for nf, npr, nans in samples:
            n_tok = 2 * nf + npr + nans
            cols = t2e[r, tt : tt + n_tok]
            sup_mask[cols[n_tok - nans :]] = True
            tt += n_tok
        nxt = np.r_[sup_mask[1:], False] & (np.r_[seg[r, 1:], 0] == seg[r]) & (seg[r] > 0)
        labels[r, nxt] = np.r_[text_ids[r, 1:], 0][nxt]
    return {
        "input_ids": ids,
        "text_segment_ids": tseg,
        "text_to_expanded": t2e,
        "frames": frames,
        "frame_mask": fmask,
        "frame_segment_ids": fseg,
        "segment_ids": seg,
        "positions": pos,
        "labels": labels,
    }


def reference(template: ModelTemplate, flat, batch, tpf):
    """Single-device loss and gradients: dense attention, natural order, all logits at once."""
    text_ids, visual = expand_packed_rows(batch, IMG, tpf)
    # expand_packed_rows indexes each row's own visual tokens; the flat [B * F * tpf] tokens of
    # every row are indexed globally here.
    frame_slots = batch["frames"].shape[1]
    offset = np.arange(visual.shape[0])[:, None] * frame_slots * tpf
    visual = np.where(visual >= 0, visual + offset, -1).astype(np.int32)
    dev = jax.devices()[0]
    keys = ("frames", "positions", "segment_ids", "labels")
    args = [
        jax.device_put(np.asarray(a), dev) for a in (text_ids, visual, *(batch[k] for k in keys))
    ]
    flat = jax.device_put(flat, dev)

    def loss_fn(flat, text_ids, visual, frames, pos, seg, labels):
        m = template.merge(flat)
        vis = m.encode_frames(frames.reshape(-1, *frames.shape[2:]))
        h = m.llm.hidden(
            inputs_embeds=m.embed(text_ids, visual, vis), positions=pos, segment_ids=seg
        )
        ce, n = token_ce_sum(m.llm.logits, h, labels)
        return ce / n

    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(flat, *args).compile(FAST_COMPILE)
    loss, grads = compiled(flat, *args)
    return float(loss), {k: np.asarray(v) for k, v in grads.items()}, compiled.as_text()


MESHES = {
    "cpu8_r2u4": None,
    "cpu8_u8": None,
    "cpu8_r8": None,
    "fsdp2_r2u2": ["fsdp=2", "ring=2", "ulysses=2"],
}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    flat = flatten_model(LongVILA(cfg, rngs=nnx.Rngs(0)))
    template = ModelTemplate.build(cfg)
    batch = packed_batch(cfg.tokens_per_frame, cfg.vision.image_size)
    return cfg, template, flat, batch, reference(template, flat, batch, cfg.tokens_per_frame)


def _mesh_cfg(name: str) -> MeshConfig:
    over = MESHES[name]
    return load_mesh_config(
        REPO / "configs/mesh" / f"{'cpu8_r2u4' if over else name}.yaml", over or ()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_loss_and_grads_match_single_device(setup, name):
    cfg, template, flat, batch, (ref_loss, ref_grads, ref_hlo) = setup
    mcfg = _mesh_cfg(name)
    mesh = make_mesh(mcfg)
    plan = MMSPPlan(
        mesh,
        seq_len=L,
        frame_slots=F_SLOTS,
        tokens_per_frame=cfg.tokens_per_frame,
        image_token_id=IMG,
        batch_axes=mcfg.activation_rules["batch"],
        ce_chunk=8,
        kv_chunk=None,
    )
    arrays = plan.to_device(batch)
    micro = {k: v[0] for k, v in arrays.items()}
    p_sh = template.shardings(mesh, mcfg.param_rules)
    flat = {k: jax.device_put(v, p_sh[k]) for k, v in flat.items()}
    if name == "fsdp2_r2u2":  # FSDP really shards: the LLM width is split over fsdp
        assert flat["llm/embed_tokens/embedding"].sharding.spec == jax.sharding.PartitionSpec(
            None, "fsdp"
        )

    def loss_fn(flat, micro):
        ce, n = plan.loss(template.merge(flat), micro)
        return ce / n

    fn = jax.jit(jax.value_and_grad(loss_fn))
    compiled = fn.lower(flat, micro).compile(FAST_COMPILE)
    loss, grads = compiled(flat, micro)
    rel = abs(float(loss) - ref_loss) / abs(ref_loss)
    assert rel <= TOL, (name, float(loss), ref_loss)
    assert set(grads) == set(ref_grads)
    # Softmax is invariant to adding a constant to every key, so the vision tower's key bias
    # (no RoPE there) has an exact gradient of 0: both sides must be rounding noise.
    zero_grad = "vision/encoder/layers/self_attn/k_proj/bias"
    scale = np.max(np.abs(ref_grads["vision/encoder/layers/self_attn/k_proj/kernel"]))
    for g in (grads[zero_grad], ref_grads[zero_grad]):
        assert np.max(np.abs(np.asarray(g))) <= TOL * scale, (name, zero_grad)
    worst = {}
    for k, g in grads.items():
        if k == zero_grad:
            continue
        r = ref_grads[k]
        assert np.max(np.abs(r)) > 0, f"{k}: zero reference gradient, the test cannot fail"
        worst[k] = float(np.max(np.abs(np.asarray(g) - r)) / np.max(np.abs(r)))
    bad = {k: v for k, v in worst.items() if v > TOL}
    print(name, "loss rel", rel, "worst grad", sorted(worst.items(), key=lambda kv: -kv[1])[:4])
    assert not bad, (name, bad)
    # No device holds a row's embedded sequence: the reference program does (the check can
    # fail), the MM-SP one never has a buffer reaching L tokens.
    shapes = _param_shapes(template, mesh, mcfg.param_rules)
    d = cfg.llm.hidden_size
    assert longest_sequence_dim(ref_hlo, d, shapes) >= L
    longest = longest_sequence_dim(compiled.as_text(), d, shapes)
    print(name, "longest per-device sequence dim of a width-D buffer:", longest, "L =", L)
    assert longest < L, (name, longest)


def longest_sequence_dim(hlo: str, hidden: int, param_shapes) -> int:
    """Largest non-feature dimension of any fp32 buffer of width ``hidden`` in a compiled
    per-device program, parameters (sharded or gathered) excluded.

    A device holding a row's whole embedded sequence has a [.., L, D] (or [b * L, D]) buffer;
    under MM-SP every such buffer is [b, L / SP, D] or a routing buffer [SP, cap, D].
    """
    params = {tuple(s) for s in param_shapes}
    longest = 0
    for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
        shape = tuple(int(x) for x in dims.split(","))
        if len(shape) < 2 or shape[-1] != hidden or shape in params:
            continue
        longest = max(longest, *shape[:-1])
    return longest


def _param_shapes(template: ModelTemplate, mesh, rules) -> list[tuple[int, ...]]:
    out = []
    for name, sh in template.shardings(mesh, rules).items():
        shape = template.shapes[name].shape
        out += [shape, sh.shard_shape(shape)]
    return out


def test_frame_owners_balanced_and_empty_slots():
    # 3 frames over 8 devices with 2 slots each: 3 devices own one frame, the rest nothing.
    slots = frame_owners(3, 8, 2)
    assert sorted(slots // 2) == sorted(set(slots // 2)) and len(slots) == 3
    owners = frame_owners(13, 4, 4) // 4
    counts = np.bincount(owners, minlength=4)
    assert counts.max() - counts.min() <= 1 and list(owners) == sorted(owners)
    with pytest.raises(ValueError, match="do not fit"):
        frame_owners(9, 4, 2)


def _simulate_delivery(rank, n_frames, frame_slots, tpf, ring, uly, groups):
    """Runs both hops in numpy: every laid-out visual slot must receive its own token."""
    b, length = rank.shape
    sp = ring * uly
    perm = zigzag_2d_permutation(length, ring, uly)
    geo = RoutingGeometry(b, groups, length, sp, frame_slots, tpf)
    t = routing_tables(geo, rank, n_frames, perm)
    bl, fpd, n_loc = geo.rows_per_group, geo.frames_per_device, length // sp
    per_dev = (t["frame_src"] >= 0).reshape(b, sp, fpd).sum(-1)  # frames each device encodes
    assert (per_dev.max(1) - per_dev.min(1)).max() <= 1  # balanced in every row
    for g in range(groups):
        src = np.full((sp, bl * fpd * tpf), -1)  # token id (row * 100 + frame) * tpf + t
        for d, r, q in np.ndindex(sp, bl, fpd):
            f = t["frame_src"][g * bl + r, d * fpd + q]
            if f >= 0:
                base = (r * fpd + q) * tpf
                src[d, base : base + tpf] = ((g * bl + r) * 100 + f) * tpf + np.arange(tpf)
        send1, send2 = t["send1"][g], t["send2"][g]
        hop1 = np.stack([np.where(send1[s] >= 0, src[s][send1[s]], -1) for s in range(sp)])
        recv1 = hop1.transpose(1, 0, 2).reshape(sp, -1)  # intermediate i: [src * hop1_capacity]
        hop2 = np.stack([np.where(send2[i] >= 0, recv1[i][send2[i]], -1) for i in range(sp)])
        recv2 = hop2.transpose(1, 0, 2).reshape(sp, -1)  # destination d: [inter * hop2_capacity]
        for r in range(bl):
            row = g * bl + r
            laid = rank[row, perm].reshape(sp, n_loc)
            idx = t["recv"][row].reshape(sp, n_loc)
            for d in range(sp):
                want = np.where(laid[d] >= 0, row * 100 * tpf + laid[d], -1)
                got = np.where(idx[d] >= 0, recv2[d][np.maximum(idx[d], 0)], -1)
                np.testing.assert_array_equal(got, want)
    return geo, t


@pytest.mark.parametrize("ring,uly,groups", [(2, 4, 1), (1, 8, 2), (8, 1, 4), (2, 2, 2)])
def test_routing_tables_deliver_every_visual_token(ring, uly, groups):
    tpf = tiny_cfg().tokens_per_frame
    batch = packed_batch(tpf, 8)
    _, rank = expand_packed_rows(batch, IMG, tpf)  # row-local visual indices = per-row ranks
    assert all((rank[r] >= 0).any() for r in (0, 1, 2, 3))
    geo, t = _simulate_delivery(rank, batch["frame_mask"].sum(1), F_SLOTS, tpf, ring, uly, groups)
    assert (t["send1"] >= 0).sum(-1).max() <= geo.hop1_capacity
    assert (t["send2"] >= 0).sum(-1).max() <= geo.hop2_capacity < geo.rows_per_group * L


@pytest.mark.parametrize("name,accum", [("cpu8_r2u4", 2), ("cpu8_r2u4", 4), ("fsdp2_r2u2", 2)])
def test_host_arrays_deliver_every_row_of_every_micro_batch(name, accum):
    """Regression: the rows of micro-batch m > 0 (and rows after the first of a micro-batch)
    must get their own frames' tokens, not be dropped to text embeddings."""
    tpf = tiny_cfg().tokens_per_frame
    batch = packed_batch(tpf, 2)
    b_all = batch["frames"].shape[0]
    # Every frame is tagged with its (row, frame) so the laid-out slots can be identified.
    tag = 1 + np.arange(b_all)[:, None] * 100 + np.arange(F_SLOTS)  # empty slots stay 0
    batch["frames"] = np.broadcast_to(
        tag[:, :, None, None, None].astype(np.float32), batch["frames"].shape
    ).copy()
    mcfg = _mesh_cfg(name)
    plan = MMSPPlan(
        make_mesh(mcfg),
        seq_len=L,
        frame_slots=F_SLOTS,
        tokens_per_frame=tpf,
        image_token_id=IMG,
        batch_axes=mcfg.activation_rules["batch"],
        grad_accum=accum,
    )
    arrays = plan.host_arrays(batch)
    text_ids, visual = expand_packed_rows(batch, IMG, tpf)
    b = b_all // accum
    geo = plan.geometry(b)
    sp, fpd, bl, n_loc = plan.sp, geo.frames_per_device, geo.rows_per_group, L // plan.sp
    delivered = 0
    for m, g in np.ndindex(accum, geo.groups):
        frames, send1, send2 = arrays["frames"][m], arrays["send1"][m, g], arrays["send2"][m, g]
        src = np.full((sp, bl * fpd * tpf), -1)  # token id: tag * tpf + t
        for d, r, q in np.ndindex(sp, bl, fpd):
            f = frames[g * bl + r, d * fpd + q, 0, 0, 0]
            base = (r * fpd + q) * tpf
            src[d, base : base + tpf] = int(f) * tpf + np.arange(tpf)
        hop1 = np.stack([np.where(send1[s] >= 0, src[s][send1[s]], -1) for s in range(sp)])
        recv1 = hop1.transpose(1, 0, 2).reshape(sp, -1)
        hop2 = np.stack([np.where(send2[i] >= 0, recv1[i][send2[i]], -1) for i in range(sp)])
        recv2 = hop2.transpose(1, 0, 2).reshape(sp, -1)
        for r in range(bl):
            row = m * b + g * bl + r
            np.testing.assert_array_equal(
                arrays["text_ids"][m, g * bl + r], text_ids[row, plan.perm]
            )
            v = visual[row, plan.perm]
            want = np.where(v >= 0, (1 + row * 100 + v // tpf) * tpf + v % tpf, -1)
            idx = arrays["recv"][m, g * bl + r]
            got = np.where(idx >= 0, recv2[np.arange(L) // n_loc, np.maximum(idx, 0)], -1)
            np.testing.assert_array_equal(got, want, err_msg=f"micro-batch {m}, row {row}")
            delivered += int((v >= 0).sum())
    assert delivered == int((visual >= 0).sum()) > 0


def test_routing_rejects_ranks_below_minus_one():
    geo = RoutingGeometry(1, 1, 64, 8, 3, 4)
    rank = np.full((1, 64), -1)
    rank[0, 8:12] = np.arange(4) - 48  # e.g. a row-local index shifted by a row offset
    with pytest.raises(ValueError, match="visual_rank row 0, position 8"):
        routing_tables(geo, rank, np.array([1]), np.arange(64))


def test_routing_fewer_frame_slots_than_devices_and_text_only_rows():
    # 3 frame slots for 8 SP devices (one slot each, 5 devices idle in row 1), a text-only row.
    tpf, length = 4, 64
    rank = np.full((2, length), -1)
    rank[1, 40:48] = np.arange(8)  # 2 frames
    rank[1, 50:54] = np.arange(8, 12)  # a third frame of the same row after some text
    geo, t = _simulate_delivery(rank, np.array([0, 3]), 3, tpf, 2, 4, 1)
    assert geo.frames_per_device == 1
    assert (t["frame_src"][0] == -1).all() and (t["frame_src"][1] >= 0).sum() == 3
    with pytest.raises(ValueError, match="row 1: visual token of frame 2"):
        _simulate_delivery(rank, np.array([0, 2]), 3, tpf, 2, 4, 1)
