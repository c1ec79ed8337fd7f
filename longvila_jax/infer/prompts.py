"""Chat prompts, stop tokens and pixel values of a request: the one place inference, V-NIAH,
VideoMME and the held-out scorer build what the model reads.

A video question becomes ``"<image>\\n" * n + question`` (LongVILA's video prompt, the one the
training pipeline builds with ``data.text.media_prompt``), rendered with a chat template up to
the assistant header, and tokenised; each ``<image>`` is one placeholder id that the model
expands into a frame's visual tokens. Generation stops at the template's end tokens, the
tokenizer's EOS or any extra stop token.

Which template (a :class:`ChatFormat`, see ``infer.chat_format``): a built-in one by name
(``data.text.TEMPLATES``, the ones this project trains with), or the checkpoint's own, as
upstream inference picks it (the top-level config's ``chat_template`` name, else the tokenizer's
``chat_template``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from longvila_jax.data.image import normalize
from longvila_jax.data.text import IMAGE_TOKEN, media_prompt
from longvila_jax.infer.chat_format import TEMPLATE_OF_ARCH, ChatFormat, as_format

# Upstream V-NIAH's fixed pre- and post-prompts (``prompt_templates`` in
# ``llava/eval/vision_niah_vila/eval_vision_niah.py``, the same on main and the Aug-2024
# branch): frames and question go between them, with no chat template and no frame separators.
VNIAH_PROMPTS = {
    "qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama_3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
        "language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


def template_for(cfg) -> str:
    """Chat template name of a model config: ``qwen2`` for Qwen2, ``llama_3`` for Llama."""
    return TEMPLATE_OF_ARCH[cfg.llm.arch]


def prompt_ids(
    tokenizer,
    question: str,
    num_frames: int,
    *,
    template: str | ChatFormat,
    image_token_id: int,
    newline_after_frame: bool = True,
    history: Sequence[dict[str, str]] = (),
) -> np.ndarray:
    """Token ids of ``[pre-prompt | num_frames placeholders | question | assistant header]``.

    Args:
      tokenizer: HF fast tokenizer whose ``<image>`` is one special token.
      question: the user question; ``<image>`` / ``<video>`` tags in it are removed, as in
        training.
      num_frames: placeholders to emit.
      template: a built-in name, ``qwen2`` or ``llama_3`` (``data.text.TEMPLATES``), or a
        :class:`~longvila_jax.infer.chat_format.ChatFormat` (e.g. the checkpoint's own).
      image_token_id: the model's placeholder id; the tokenizer's ``<image>`` id is mapped to
        it when they differ.
      newline_after_frame: ``"<image>\\n"`` per frame (our training) or bare ``<image>``
        (upstream V-NIAH).
      history: earlier text-only turns before the question (``{"role", "content"}`` with
        ``system`` / ``user`` / ``assistant`` roles, as the template renders them; their
        ``<image>`` / ``<video>`` tags are removed). Default none: the one-turn prompt.

    Returns:
      int32 [T] with exactly ``num_frames`` entries equal to ``image_token_id``.

    Raises:
      ValueError: an unknown template, a tokenizer that splits ``<image>``, or a question whose
        tokens already hold the model's placeholder id.
    """
    fmt = as_format(template)
    separator = "\n" if newline_after_frame else ""
    # media_prompt(question, 0) is the question with its media tags removed.
    content = (IMAGE_TOKEN + separator) * num_frames + media_prompt(question, 0)
    earlier = [{"role": m["role"], "content": media_prompt(m["content"], 0)} for m in history]
    text = tokenizer.apply_chat_template(
        [*earlier, {"role": "user", "content": content}],
        chat_template=fmt.template,
        tokenize=False,
        add_generation_prompt=True,
    )
    encoded = tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    return _placeholders(tokenizer, np.asarray(encoded, np.int32), num_frames, image_token_id)


def vniah_upstream_ids(
    tokenizer, question: str, num_frames: int, *, template: str, image_token_id: int
) -> np.ndarray:
    """Upstream V-NIAH's prompt ids: ``[pre-prompt | num_frames bare placeholders | question |
    post-prompt]`` with its fixed strings (``VNIAH_PROMPTS``).

    Each piece is tokenised on its own without the automatic BOS, as upstream's
    ``safe_tokenize`` (which drops it), so the Llama-3 pre-prompt's literal
    ``<|begin_of_text|>`` is the only BOS.

    Returns:
      int32 [T] with exactly ``num_frames`` entries equal to ``image_token_id``.

    Raises:
      ValueError: an unknown template or a tokenizer that splits ``<image>``.
    """
    if template not in VNIAH_PROMPTS:
        raise ValueError(f"V-NIAH template must be one of {sorted(VNIAH_PROMPTS)}: {template!r}")
    pre, post = VNIAH_PROMPTS[template]
    # The question is used verbatim (upstream embeds the needle dataset's text unchanged).
    pieces = [pre, IMAGE_TOKEN * num_frames, question, post]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    flat = np.asarray([i for piece in ids for i in piece], np.int32)
    return _placeholders(tokenizer, flat, num_frames, image_token_id)


def _placeholders(tokenizer, ids: np.ndarray, num_frames: int, image_token_id: int) -> np.ndarray:
    """Checks that ``ids`` hold ``num_frames`` ``<image>`` ids and maps them to the model's."""
    tokenizer_image = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    found = int((ids == tokenizer_image).sum())
    if found != num_frames:
        raise ValueError(
            f"tokenizer: {IMAGE_TOKEN} is not a single special token ({found} ids "
            f"{tokenizer_image} for {num_frames} frames)"
        )
    if tokenizer_image != image_token_id:
        if (ids == image_token_id).any():
            raise ValueError(f"prompt text contains the model's placeholder id {image_token_id}")
        ids = np.where(ids == tokenizer_image, image_token_id, ids).astype(np.int32)
    return ids


def answer_ids(tokenizer, answer: str, what: str = "answer") -> np.ndarray:
    """Token ids [K] (int32, K >= 1) of a reference answer, tokenised on its own.

    Raises:
      ValueError: the answer tokenises to nothing (``what`` names it in the message).
    """
    ids = np.asarray(tokenizer(answer, add_special_tokens=False)["input_ids"], np.int32)
    if ids.size == 0:
        raise ValueError(f"{what} {answer!r} tokenizes to nothing")
    return ids


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of ``text``, which must tokenise to exactly one token (``what`` names it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} is not a single token (ids {ids})")
    return int(ids[0])


def stop_ids(
    tokenizer, template: str | ChatFormat | None, extra: Iterable[int | str] = ()
) -> list[int]:
    """Sorted stop ids: the template's end tokens (``ChatFormat.end_tokens``; a name is a
    built-in format) and the tokenizer's EOS (when the tokenizer knows them), plus ``extra``
    ids or single-token strings. ``tokenizer`` may be None when every extra stop is an id."""
    ids = set()
    if tokenizer is not None:
        ends = as_format(template).end_tokens if template is not None else ()
        for token in (*ends, tokenizer.eos_token):
            i = tokenizer.convert_tokens_to_ids(token) if token else None
            if i is not None and i != tokenizer.unk_token_id:
                ids.add(int(i))
    for stop in extra:
        if isinstance(stop, (int, np.integer)):
            ids.add(int(stop))
        elif tokenizer is None:
            raise ValueError(f"stop token {stop!r} needs a tokenizer (give its id instead)")
        else:
            ids.add(single_token_id(tokenizer, stop, "stop token"))
    return sorted(ids)


def pixel_values(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Frames as the vision tower reads them.

    Args:
      frames: uint8 [n, S, S, 3] RGB (normalised here), or float [n, S, S, 3] taken as
        already normalised; S = ``image_size``.

    Returns:
      float32 [n, S, S, 3] in [-1, 1].
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"frames must have shape [n, {image_size}, {image_size}, 3], got {frames.shape}"
        )
    if frames.dtype == np.uint8:
        return normalize(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or normalised floats, got {frames.dtype}")
    return frames.astype(np.float32)


__all__ = [
    "TEMPLATE_OF_ARCH",
    "VNIAH_PROMPTS",
    "answer_ids",
    "pixel_values",
    "prompt_ids",
    "single_token_id",
    "stop_ids",
    "template_for",
    "vniah_upstream_ids",
]
