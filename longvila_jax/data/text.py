"""Tokenizer loading, LongVILA chat templates and assistant-only label masks.

The tokenizer is a Hugging Face fast tokenizer read from a local directory (never the hub, never
remote code). Conversations are rendered with jinja chat templates through
``apply_chat_template``: ``qwen2`` is LongVILA's ChatML template and ``llama_3`` the Llama-3 format
of the v1 release (longvila.md §3.5). Supervised tokens are the assistant replies and the end token
right after each reply. Their character spans are found by rendering the conversation up to the
reply (with the generation prompt) and through the reply, and tokens are mapped to characters with
the fast tokenizer's offsets, so no tokenisation is done by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longvila_jax.core.errors import ConfigError, brief
from longvila_jax.core.safe_paths import check_folder
from longvila_jax.core.tokens import IMAGE_TOKEN, image_token_id
from longvila_jax.data.skips import SampleSkipped

QWEN2_SYSTEM = "You are a helpful assistant"
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + QWEN2_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
    "{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TEMPLATES = {"qwen2": QWEN2_TEMPLATE, "llama_3": LLAMA3_TEMPLATE}
END_TOKENS = {"qwen2": "<|im_end|>", "llama_3": "<|eot_id|>"}
_TEMPLATE_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a fast tokenizer from a local directory and checks the media token.

    Raises:
      ConfigError: naming ``tokenizer_dir``: the directory is missing, holds no loadable fast
        tokenizer, or ``<image>`` is not a single special token.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("tokenizer_dir", f"{path} is not a directory")
    check_folder(path, path, "tokenizer_dir", ConfigError)  # no FIFO, no link out of it
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except MemoryError:
        raise
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors)
        raise ConfigError("tokenizer_dir", f"{path}: cannot load a tokenizer ({brief(e)})") from e
    if not tok.is_fast:
        raise ConfigError("tokenizer_dir", f"{path}: not a fast tokenizer (offsets are needed)")
    ids = tok(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(
            "tokenizer_dir", f"{IMAGE_TOKEN} must be one special token in {path}, got {brief(ids)}"
        )
    return tok


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenised sample before visual-token expansion.

    Attributes:
      input_ids: int32 [n], with one ``<image>`` id per frame.
      supervised: bool [n], True where the token is a training target (assistant text).
    """

    input_ids: np.ndarray
    supervised: np.ndarray


def media_prompt(question: str, n_frames: int) -> str:
    """LongVILA's video prompt: ``"<image>\\n" * n_frames + question`` (media tags removed)."""
    q = question.replace("<video>", "").replace(IMAGE_TOKEN, "").strip()
    return IMAGE_TOKEN + "\n" + (IMAGE_TOKEN + "\n") * (n_frames - 1) + q if n_frames else q


def _render(tok, messages, template: str, generation: bool) -> str:
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def encode_conversation(
    tok: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    template: str = "qwen2",
    system_prompt: str | None = None,
) -> Encoded:
    """Renders and tokenises a conversation with assistant-only supervision.

    Args:
      tok: fast tokenizer.
      messages: ``[{"role": "user" | "assistant", "content": str}, ...]``.
      template: ``qwen2`` or ``llama_3``.
      system_prompt: replaces the template's default system message when given.

    Returns:
      ``Encoded`` with ``supervised`` True on each assistant reply and its end token.

    Raises:
      SampleSkipped: ``bad_record`` if a message contains template control tokens.
    """
    for m in messages:
        if any(marker in m["content"] for marker in _TEMPLATE_MARKERS):
            raise SampleSkipped("bad_record", "message contains chat-template control tokens")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is not None:
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    tmpl, end = TEMPLATES[template], END_TOKENS[template]
    full = _render(tok, msgs, tmpl, False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tok, msgs[:k], tmpl, True)
        through = _render(tok, msgs[: k + 1], tmpl, False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(f"chat template {template!r} does not render conversations by prefix")
        stop = through.find(end, len(before) + len(m["content"]))
        if stop < 0:
            raise ValueError(f"chat template {template!r} has no {end} after a reply")
        spans.append((len(before), stop + len(end)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    sup = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        sup |= (starts >= a) & (starts < b)
    return Encoded(ids, sup)


def encode_document(tok: PreTrainedTokenizerBase, text: str) -> Encoded:
    """Interleaved document: every text token and the final EOS supervised, media tokens not."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = [*ids, tok.eos_token_id]
    arr = np.asarray(ids, dtype=np.int32)
    return Encoded(arr, arr != image_token_id(tok))


def encode_caption(tok: PreTrainedTokenizerBase, caption: str) -> Encoded:
    """A stage-2 COYO caption: ``"<image>\\n{caption}<eos>"``, no template, no question.

    Upstream's ``LazyCoyoDataset`` (``llava/data/dataset.py``, 386d350 and b760c34) writes a
    literal ``<image>`` in the caption as ``<IMAGE>``, appends the tokenizer's EOS string and
    tokenises with ``tokenizer_image_token``: the tokenizer's own BOS (if it adds one) comes
    first, then the media token, then the rest without a second BOS. Its labels are the ids with
    the pad id masked, so every text token is supervised except pad ids (an EOS that doubles as
    the pad is not; stage 1's ``[PAD]`` makes them differ, see ``ckpt.hf_parts_import``).

    Returns:
      ``Encoded`` [n]: ``supervised`` False on the media token and on pad ids.
    """
    rest = "\n" + caption.replace(IMAGE_TOKEN, "<IMAGE>") + tok.eos_token
    lead = tok("", add_special_tokens=True)["input_ids"][:1]
    bos = lead if tok.bos_token_id is not None and lead == [tok.bos_token_id] else []
    ids = [*bos, image_token_id(tok), *tok(rest, add_special_tokens=False)["input_ids"]]
    arr = np.asarray(ids, dtype=np.int32)
    sup = arr != image_token_id(tok)
    if tok.pad_token_id is not None:
        sup &= arr != tok.pad_token_id
    return Encoded(arr, sup)


__all__ = [
    "END_TOKENS",
    "IMAGE_TOKEN",
    "LLAMA3_SYSTEM",
    "QWEN2_SYSTEM",
    "TEMPLATES",
    "Encoded",
    "encode_caption",
    "encode_conversation",
    "encode_document",
    "image_token_id",
    "load_tokenizer",
    "media_prompt",
]
