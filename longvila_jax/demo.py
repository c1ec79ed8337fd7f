"""The tiny end-to-end demo (the README's main command): no downloads, CPU, under a minute.

It exercises the foundation the way a user would with a released checkpoint:

1. generates a small synthetic corpus (tokenizer + short videos) locally;
2. builds a tiny random LongVILA (``configs/model/tiny-qwen2.yaml``) and writes it in the VILA
   layout of the HF hub releases (``config.json`` + ``llm/``, ``vision_tower/``, ``mm_projector/``);
3. converts that directory into this project's Orbax checkpoint (``longvila_jax.convert``'s
   importer) and back to the VILA layout, checking the round trip is byte-identical;
4. loads the converted checkpoint with ``longvila_jax.load_pretrained``, decodes a video,
   builds the ``"<image>\\n" x frames + question`` ChatML prompt and runs a forward pass, checking
   that the logits equal those of the original in-memory model.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "configs" / "model" / "tiny-qwen2.yaml"


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def run(out: Path, model_yaml: Path, frames: int, seed: int) -> dict:
    """Runs the demo under ``out`` (recreated) and returns a summary dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from longvila_jax.ckpt.fresh import write_vila
    from longvila_jax.ckpt.pretrained import load_pretrained, load_tokenizer
    from longvila_jax.ckpt.vila_export import export_vila
    from longvila_jax.ckpt.vila_import import import_vila
    from longvila_jax.config import ModelConfig, load_config
    from longvila_jax.data import synthetic
    from longvila_jax.data.image import normalize
    from longvila_jax.data.text import TEMPLATES, media_prompt
    from longvila_jax.data.video import decode_video
    from longvila_jax.models.vlm import LongVILA

    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = load_config(ModelConfig, model_yaml)
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    data = out / "data"
    synthetic.generate(data, seed=seed, size=cfg.vision.image_size, n_images=4, n_videos=2)
    say(f"synthetic corpus and tokenizer written to {data}")

    with nnx.use_eager_sharding(False):
        model = LongVILA(cfg, rngs=nnx.Rngs(seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    vila = write_vila(model, data / "tokenizer", out / "vila_random")
    say(f"tiny random LongVILA ({n_params:,} params) written in the VILA layout to {vila}")

    ckpt = out / "ckpt"
    import_vila(vila, ckpt)
    say(f"converted to the project checkpoint {ckpt}")
    back = out / "vila_exported"
    export_vila(ckpt, back)
    identical = _same_tree(vila, back)
    say(f"exported back to the VILA layout {back}: byte-identical round trip = {identical}")

    loaded = load_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    video = data / "videos" / "vid_0000.mp4"
    pixels = normalize(decode_video(video, size=cfg.vision.image_size, num_frames=frames))
    question = "What number appears in the video?"
    messages = [{"role": "user", "content": media_prompt(question, len(pixels))}]
    text = tok.apply_chat_template(
        messages, chat_template=TEMPLATES["qwen2"], tokenize=False, add_generation_prompt=True
    )
    ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]], np.int32)
    logits = np.asarray(loaded(ids, jnp.asarray(pixels)))
    reference = np.asarray(model(ids, jnp.asarray(pixels)))
    max_diff = float(np.abs(logits - reference).max())
    next_id = int(logits[0, -1].argmax())
    say(
        f"forward pass: {len(pixels)} frames x {cfg.tokens_per_frame} visual tokens + "
        f"{ids.shape[1] - len(pixels)} text tokens -> logits {logits.shape}; "
        f"max |converted - original| = {max_diff:.2e}; "
        f"untrained next token {tok.decode([next_id])!r}"
    )
    ok = identical and max_diff == 0.0
    say("demo " + ("passed" if ok else "FAILED"))
    return {
        "params": n_params,
        "round_trip_identical": identical,
        "logits_shape": list(logits.shape),
        "max_abs_diff": max_diff,
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longvila_jax", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="work directory (recreated)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model config YAML")
    p.add_argument("--frames", type=int, default=8, help="video frames in the prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = run(args.out, args.model, args.frames, args.seed)
    return 0 if summary["ok"] else 1
