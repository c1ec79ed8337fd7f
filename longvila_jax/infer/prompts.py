"""Chat prompts, stop tokens and pixel values of a request: the one place inference, V-NIAH,
VideoMME and the held-out scorer build what the model reads.

A video question becomes ``"<image>\\n" * n + question`` (LongVILA's video prompt, the one the
training pipeline builds with ``data.text.media_prompt``), rendered with the chat template the
model was trained with (``data.text.TEMPLATES``) up to the assistant header, and tokenised; each
``<image>`` is one placeholder id that the model expands into a frame's visual tokens.
Generation stops at the template's end token, the tokenizer's EOS or any extra stop token.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from longvila_jax.data.image import normalize
from longvila_jax.data.text import END_TOKENS, IMAGE_TOKEN, TEMPLATES, media_prompt

# The chat template each LLM architecture was trained with (longvila.md §3.5).
TEMPLATE_OF_ARCH = {"qwen2": "qwen2", "llama": "llama_3"}


def template_for(cfg) -> str:
    """Chat template name of a model config: ``qwen2`` for Qwen2, ``llama_3`` for Llama."""
    return TEMPLATE_OF_ARCH[cfg.llm.arch]


def prompt_ids(
    tokenizer,
    question: str,
    num_frames: int,
    *,
    template: str,
    image_token_id: int,
    newline_after_frame: bool = True,
) -> np.ndarray:
    """Token ids of ``[pre-prompt | num_frames placeholders | question | assistant header]``.

    Args:
      tokenizer: HF fast tokenizer whose ``<image>`` is one special token.
      question: the user question; ``<image>`` / ``<video>`` tags in it are removed, as in
        training.
      num_frames: placeholders to emit.
      template: ``qwen2`` or ``llama_3`` (``data.text.TEMPLATES``).
      image_token_id: the model's placeholder id; the tokenizer's ``<image>`` id is mapped to
        it when they differ.
      newline_after_frame: ``"<image>\\n"`` per frame (our training) or bare ``<image>``
        (upstream V-NIAH).

    Returns:
      int32 [T] with exactly ``num_frames`` entries equal to ``image_token_id``.

    Raises:
      ValueError: an unknown template, a tokenizer that splits ``<image>``, or a question whose
        tokens already hold the model's placeholder id.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    separator = "\n" if newline_after_frame else ""
    # media_prompt(question, 0) is the question with its media tags removed.
    content = (IMAGE_TOKEN + separator) * num_frames + media_prompt(question, 0)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=TEMPLATES[template],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
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


def stop_ids(tokenizer, template: str | None, extra: Iterable[int | str] = ()) -> list[int]:
    """Sorted stop ids: the template's end token and the tokenizer's EOS (when the tokenizer
    knows them), plus ``extra`` ids or single-token strings. ``tokenizer`` may be None when
    every extra stop is an id."""
    ids = set()
    if tokenizer is not None:
        for token in (END_TOKENS[template], tokenizer.eos_token):
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
    "answer_ids",
    "pixel_values",
    "prompt_ids",
    "single_token_id",
    "stop_ids",
    "template_for",
]
