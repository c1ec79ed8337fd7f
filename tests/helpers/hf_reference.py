"""PyTorch reference of a whole VILA model, loaded with HF transformers from a VILA layout.

``llm/`` loads with ``AutoModelForCausalLM``, ``vision_tower/`` with ``SiglipVisionModel`` (no
remote code), ``mm_projector/`` into ``reference.torch_projector.TorchProjector``. The splice
follows longvila.md section 3.4: each ``<image>`` id becomes its frame's projector outputs
(SigLIP ``hidden_states[-2]``), every other id its embedding row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers as tf

from helpers.torch_projector import TorchProjector


def load_hf(vila_dir: Path, dtype=torch.float32):
    """(llm, vision, projector) torch modules read from a VILA-layout directory."""
    vila_dir = Path(vila_dir)
    llm = tf.AutoModelForCausalLM.from_pretrained(
        vila_dir / "llm", dtype=dtype, attn_implementation="eager", trust_remote_code=False
    ).eval()
    vision = tf.SiglipVisionModel.from_pretrained(
        vila_dir / "vision_tower", dtype=dtype, attn_implementation="eager"
    ).eval()
    pcfg = json.loads((vila_dir / "mm_projector" / "config.json").read_text())
    top = json.loads((vila_dir / "config.json").read_text())
    order = "row_major" if pcfg["mm_projector_type"].endswith("_fix") else "col_major"
    if llm.config.model_type == "qwen2":
        order = "row_major"
    proj = TorchProjector(
        pcfg["mm_projector_type"], top["mm_hidden_size"], llm.config.hidden_size, order
    )
    sd = safetensors.torch.load_file(vila_dir / "mm_projector" / "model.safetensors")
    proj.load_state_dict(sd)
    return llm, vision, proj.to(dtype).eval()


@torch.no_grad()
def vlm_logits(models, input_ids: np.ndarray, pixels_nhwc: np.ndarray, image_id: int):
    """[T_exp, V] float32 logits of one prompt (1-D ``input_ids``) with its frames."""
    llm, vision, proj = models
    dtype = next(llm.parameters()).dtype
    px = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))).to(dtype)
    feats = vision(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    visual = proj(feats)  # [N, T, D]
    table = llm.get_input_embeddings()
    parts, frame = [], 0
    for tid in input_ids.tolist():
        if tid == image_id:
            parts.append(visual[frame])
            frame += 1
        else:
            parts.append(table(torch.tensor([tid])))
    embeds = torch.cat(parts)[None]
    return llm(inputs_embeds=embeds).logits[0].float().numpy()


def prompt(image_id: int, n_frames: int, newline_id: int = 3) -> np.ndarray:
    """``w5 w6 (<image> \\n) x n w7 w8``-style ids."""
    ids = [5, 6]
    for _ in range(n_frames):
        ids += [image_id, newline_id]
    return np.array(ids + [7, 8, 9], np.int32)


def frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n, size, size, 3] normalised pixels in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
