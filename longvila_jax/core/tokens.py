"""The media placeholder token, shared by the data pipeline, the checkpoint converters and the
visual-token splice.

A prompt carries one ``<image>`` token per frame; the splice (``models.vlm.expand_prompts``,
``parallel.layouts.expand_packed_rows``) replaces each by the frame's visual tokens. Its id comes
from the tokenizer, so this module only needs the tokenizer's ``convert_tokens_to_ids`` (no
``transformers`` import).
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"


def image_token_id(tokenizer: Any) -> int | None:
    """Id of ``<image>`` in ``tokenizer``, or None when it has no such token.

    A tokenizer without the token maps it to its unknown-token id (or None), which must not be
    taken for a placeholder id: every unknown word would then be spliced as a frame.
    """
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(token_id)


__all__ = ["IMAGE_TOKEN", "image_token_id"]
