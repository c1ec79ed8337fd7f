"""Which chat template renders a checkpoint's prompts, where its answers stop, and whether the
tokenizer's automatic BOS is kept (longvila.md §3.5, upstream-audit.md items 11-12).

Upstream inference (VILA main ``llava/model/language_model/builder.py``) loads the LLM
tokenizer with its own ``chat_template`` and replaces it by the bundled
``chat_templates/<name>.jinja`` when the checkpoint's top-level ``config.json`` names one
(``chat_template: qwen2``); ``llava/utils/tokenizer.py`` renders with ``apply_chat_template``
and tokenises the text with ``tokenizer(prompt)``, i.e. with the tokenizer's special tokens.
:func:`chat_format` applies the same precedence to a checkpoint: the config's named template,
else the tokenizer's own, else the built-in template of the LLM architecture
(``data.text.TEMPLATES``, the ones this project trains with).

End tokens follow ``infer_stop_tokens`` there: the token the template puts right after an
assistant reply (found by rendering a reply made of a marker string), plus EOS. The built-in
``llama_3`` format also stops at ``<|end_of_text|>``: the v1 release's ``llama_3_chat``
(``llava/conversation.py`` on the Aug-2024 branch) ends the last message with
``sep2 = <|end_of_text|>``, so that release was trained to emit it.

BOS: both upstream generations tokenise the rendered prompt with the tokenizer's special tokens
(``tokenizer_image_token`` on the Aug-2024 branch keeps the first chunk's automatic BOS; main
calls ``tokenizer(prompt)``). The Llama-3 system string already starts with a literal
``<|begin_of_text|>``, so a v1 prompt starts with BOS twice. That is what the release saw in
training and at inference, so the format of an upstream checkpoint (one that carries a VILA
top-level config) keeps the automatic BOS (``add_special_tokens=True``) and reproduces the
doubled BOS; checkpoints without one were trained by this project, whose training text
(``data.text.encode_conversation``) is tokenised without special tokens, and keep that.
Qwen2 tokenizers add no BOS, so the choice only matters for Llama-3.
"""

from __future__ import annotations

import dataclasses

from longvila_jax.core.errors import ConfigError
from longvila_jax.data.text import END_TOKENS, TEMPLATES

# The chat template each LLM architecture was trained with (longvila.md §3.5).
TEMPLATE_OF_ARCH = {"qwen2": "qwen2", "llama": "llama_3"}

# Stops beyond the template's own end token: v1's ``sep2`` (see the module docstring).
_EXTRA_STOPS = {"qwen2": (), "llama_3": ("<|end_of_text|>",)}

# A reply that no template rewrites, to find what a template puts after a reply.
_REPLY_MARKER = "\x00reply\x00"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How prompts are rendered and where generation stops.

    Attributes:
      name: a built-in template name (``qwen2``, ``llama_3``), ``config:<name>`` for the
        top-level config's named template, or ``tokenizer`` for the tokenizer's own.
      template: the jinja source given to ``apply_chat_template``.
      end_tokens: token strings that end an answer besides the tokenizer's EOS.
      add_special_tokens: tokenise the rendered prompt with the tokenizer's special tokens
        (upstream's automatic BOS) or without (this project's training).
    """

    name: str
    template: str
    end_tokens: tuple[str, ...]
    add_special_tokens: bool = False


def builtin_format(name: str, *, add_special_tokens: bool = False) -> ChatFormat:
    """The built-in format ``qwen2`` or ``llama_3`` (``data.text.TEMPLATES``).

    Raises:
      ValueError: an unknown name.
    """
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {name!r}")
    ends = (END_TOKENS[name], *_EXTRA_STOPS[name])
    return ChatFormat(name, TEMPLATES[name], ends, add_special_tokens)


def reply_end_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The token a template writes right after an assistant reply (empty if none), as
    upstream's ``infer_stop_tokens`` finds it: render a one-turn conversation whose reply is a
    marker and read the first token after it."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY_MARKER}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    at = text.find(_REPLY_MARKER)
    if at < 0:
        return ()
    after = tokenizer(text[at + len(_REPLY_MARKER) :], add_special_tokens=False)["input_ids"]
    return (tokenizer.convert_ids_to_tokens(int(after[0])),) if after else ()


def chat_format(
    tokenizer, arch: str, config_template: str | None = None, upstream: bool = False
) -> ChatFormat:
    """The format of a checkpoint, with upstream's precedence (module docstring).

    Args:
      tokenizer: the checkpoint's fast tokenizer (its ``chat_template`` may be None).
      arch: ``cfg.llm.arch`` (``qwen2`` / ``llama``): the fallback built-in template.
      config_template: the top-level config's ``chat_template`` name, if any.
      upstream: the checkpoint is an upstream release (keep the automatic BOS).

    Raises:
      ConfigError(``chat_template``): a config template name without a built-in equivalent.
    """
    if config_template is not None:
        # Upstream's bundled qwen2.jinja renders the same text as the built-in qwen2 template.
        if config_template not in TEMPLATES:
            raise ConfigError(
                "chat_template",
                f"{config_template!r} has no built-in equivalent ({sorted(TEMPLATES)})",
            )
        fmt = builtin_format(config_template, add_special_tokens=upstream)
        return dataclasses.replace(fmt, name=f"config:{config_template}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return ChatFormat("tokenizer", own, reply_end_tokens(tokenizer, own), upstream)
    return builtin_format(TEMPLATE_OF_ARCH[arch], add_special_tokens=upstream)


def as_format(template: str | ChatFormat) -> ChatFormat:
    """A :class:`ChatFormat` from a built-in name or a format."""
    return template if isinstance(template, ChatFormat) else builtin_format(template)


__all__ = [
    "TEMPLATE_OF_ARCH",
    "ChatFormat",
    "as_format",
    "builtin_format",
    "chat_format",
    "reply_end_tokens",
]
