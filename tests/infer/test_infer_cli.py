"""End to end: ``python -m longvila_jax.infer`` on a synthetic video and a tiny checkpoint made
here (random tiny model saved as a project checkpoint with the synthetic corpus's tokenizer),
``Generator.generate`` / ``stream`` with sampling settings, and teacher-forced scoring with the
MM-SP forward.

References are dense single-device recomputations (``LongVILA.__call__``) of the same prompt:
the CLI's streamed answer must be the greedy continuation they give, token for token, and the
teacher-forced logits must match them within fp32 1e-5.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.infer_cases import FAST, max_abs, tiny_config

from longvila_jax.ckpt import orbax_io
from longvila_jax.data.synthetic import NEEDLE_QUESTION, train_tokenizer
from longvila_jax.data.text import load_tokenizer
from longvila_jax.data.video import write_video
from longvila_jax.infer import Generator, SamplingParams
from longvila_jax.infer.__main__ import main
from longvila_jax.models.vlm import expand_prompts
from longvila_jax.parallel.mesh import load_mesh_config, make_mesh

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "configs/mesh/cpu8_r2u4.yaml"
QUESTION = "What number is shown?"
NEW = 6


def _save_checkpoint(model, tokenizer_dir: Path, out: Path) -> None:
    """A project checkpoint (``ckpt.orbax_io`` layout) of an in-memory model."""
    inv = {v: k for k, v in orbax_io.ATTR.items()}
    pure = nnx.to_pure_dict(nnx.state(model))

    def leaves(tree, prefix=()):
        for k, v in tree.items():
            yield from leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]

    with orbax_io.checkpoint_dir(out) as tmp:
        orbax_io.write_metadata(tmp, model.cfg, {"source": {"layout": "random"}})
        writer = orbax_io.ParamWriter(tmp)
        for attr, sub in pure.items():
            for path, value in leaves(sub):
                writer.save(inv[attr], path, np.asarray(value))
        writer.finalize()
        shutil.copytree(tokenizer_dir, tmp / orbax_io.HF_DIR / "llm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_cli")
    texts = [QUESTION, NEEDLE_QUESTION, "a red video showing the number 42", "blue green 7"] * 8
    train_tokenizer(texts, tmp / "tok")
    tok = load_tokenizer(tmp / "tok")
    model = _model()
    _save_checkpoint(model, tmp / "tok", tmp / "ckpt")
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (6, 1, 64, 64, 3), dtype=np.uint8), 2, axis=1)
    write_video(tmp / "clip.mp4", frames.reshape(12, 64, 64, 3), fps=4)
    return model, tok, tmp


def _model():
    from longvila_jax.models.vlm import LongVILA

    return LongVILA(tiny_config(), rngs=nnx.Rngs(1))


def _greedy_recompute(model, ids: np.ndarray, pix: np.ndarray, stops, n_new: int):
    """Greedy decoding by full recomputation (fixed padded width, so one compilation)."""
    tpf, n = model.cfg.tokens_per_frame, len(pix)
    width = len(ids) + n_new
    out = []
    for _ in range(n_new):
        cur = np.concatenate([ids, np.asarray(out, np.int32)])
        row = np.pad(cur, (0, width - len(cur)), constant_values=11)  # causal: never read
        logits = np.asarray(model(row[None], jnp.asarray(pix)))[0]
        out.append(int(np.argmax(logits[len(cur) + n * (tpf - 1) - 1])))
        if out[-1] in stops:
            break
    return out


@pytest.mark.slow
def test_cli_streams_the_greedy_answer(setup, capsys):
    model, tok, tmp = setup
    argv = ["--model", str(tmp / "ckpt"), "--video", str(tmp / "clip.mp4"), "--frames", "4"]
    argv += ["--mesh", str(MESH), "--max-new-tokens", str(NEW), QUESTION]
    assert main(argv) == 0
    captured = capsys.readouterr()
    ref = Generator(model, tok)  # host-side helpers only: nothing is compiled here
    frames = ref.load_frames(str(tmp / "clip.mp4"), 4)
    stops = ref.stop_ids()
    want = _greedy_recompute(
        model, ref.prompt_ids(QUESTION, 4), ref.pixel_values(frames), stops, NEW
    )
    text = tok.decode([t for t in want if t not in stops], skip_special_tokens=True)
    assert text, "the reference answer is empty; pick another model seed"
    assert captured.out == text + "\n"
    reason = "stop" if want[-1] in stops else "length"
    assert "4 frames" in captured.err and f"{len(want)} new tokens ({reason})" in captured.err


def test_cli_reports_bad_input(setup, capsys):
    _, _, tmp = setup
    argv = ["--model", str(tmp / "ckpt"), "--video", str(tmp / "missing.mp4"), QUESTION]
    assert main(argv) == 1
    assert "missing_file" in capsys.readouterr().err


def test_fps_sampling_caps_frames(setup):
    model, tok, tmp = setup
    gen = Generator(model, tok)
    assert len(gen.load_frames(str(tmp / "clip.mp4"), 8, fps=1.0)) == 3  # 12 frames at 4 fps
    assert len(gen.load_frames(str(tmp / "clip.mp4"), 5)) == 5


def test_teacher_forced_matches_dense_forward(setup):
    model, tok, tmp = setup
    mesh = make_mesh(load_mesh_config(MESH), jax.devices()[:8])
    gen = Generator(model, tok, mesh=mesh, compiler_options=FAST)
    frames = gen.load_frames(str(tmp / "clip.mp4"), 4)
    answer = "the number 42"
    res = gen.teacher_forced(QUESTION, answer, frames=frames)
    prompt = gen.prompt_ids(QUESTION, 4)
    ans = np.asarray(tok(answer, add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(res.answer_ids, ans)
    logits = np.asarray(model(np.concatenate([prompt, ans])[None], gen.pixel_values(frames)))[0]
    start = len(prompt) + 4 * (model.cfg.tokens_per_frame - 1) - 1
    ref = logits[start : start + len(ans)]
    np.testing.assert_array_equal(res.predicted_ids, ref.argmax(-1))
    ref_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ref), -1))[np.arange(len(ans)), ans]
    assert max_abs(res.logprobs, ref_lp) <= 1e-5
    assert res.exact_match == bool(np.array_equal(ref.argmax(-1), ans))
    # The full logits at the answer positions (the generator's scorer, the one V-NIAH,
    # VideoMME and the held-out accuracy use), not only their argmax and log-probs.
    cfg = model.cfg
    expanded = expand_prompts(
        np.concatenate([prompt, ans])[None],
        num_frames=4,
        image_token_id=cfg.image_token_id,
        tokens_per_frame=cfg.tokens_per_frame,
        vocab_size=cfg.llm.vocab_size,
    )
    table = gen.scorer.encode(frames)
    query = (start + np.arange(len(ans)))[None]
    own = gen.scorer.logits_at(expanded.text_ids, expanded.visual_index, table, query)[0]
    assert max_abs(own, ref) <= 1e-5


def test_generate_and_stream_follow_the_sampling_settings(setup):
    """``generate`` and ``stream`` take one ``SamplingParams``: the same settings give the same
    text, the budget bounds the tokens, an extra stop token ends the answer."""
    model, tok, tmp = setup
    gen = Generator(model, tok, compiler_options=FAST)
    video = dict(video=str(tmp / "clip.mp4"), num_frames=4)
    sampling = SamplingParams(max_new_tokens=NEW, temperature=1.5, seed=3)
    result = gen.generate(QUESTION, sampling=sampling, **video)
    assert "".join(gen.stream(QUESTION, sampling=sampling, **video)) == result.text
    assert 1 <= len(result.tokens) <= NEW and result.num_frames == 4
    # A stop at the second token: the answer is cut there, with the stop token counted.
    second = int(result.tokens[1])
    stopped = gen.generate(
        QUESTION, sampling=dataclasses.replace(sampling, stop=(second,)), **video
    )
    np.testing.assert_array_equal(
        stopped.tokens, result.tokens[: list(result.tokens).index(second) + 1]
    )
    assert stopped.finish_reason == "stop"


def test_cli_reports_garbage_model_dir(tmp_path, capsys):
    """A garbage model folder (malformed ``model.yaml``, no integrity manifest): one
    ``error:`` line naming it, exit 1."""
    (tmp_path / "params").mkdir()
    (tmp_path / "model.yaml").write_text("llm: [\n")
    argv = ["--model", str(tmp_path), "--video", str(tmp_path / "clip.mp4"), QUESTION]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path}") and "Traceback" not in err
