"""One answer's text as its tokens arrive: incremental detokenisation and stop strings.

The text is the tokenizer's decoding of all tokens so far (a token may complete a multi-byte
character, so the whole answer is decoded each time and only the new suffix is emitted). Both
``infer.Generator`` and the server's scheduler stream through it, so they send the same text.
OpenAI's ``stop`` strings end the answer where one first appears, and the returned text
excludes it; to stream that exactly, the last ``len(stop) - 1`` characters are held back until
they can no longer begin a stop string.
"""

from __future__ import annotations


class AnswerText:
    """Accumulates one row's tokens and says what may be sent.

    Args:
      tokenizer: the model's tokenizer (``decode(ids, skip_special_tokens=True)``).
      stop: OpenAI stop strings (may be empty).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the decodable text so far, cut at a stop string once one appears
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Adds a token; returns the text that may be sent now ("" when nothing new)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        self.text = text
        # A stop string can only start within the unsent text plus the held-back tail.
        start = max(self.sent - self.hold, 0)
        cut = min((i for s in self.stop if (i := text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        ready = len(text) - self.hold
        if ready <= self.sent:
            return ""
        delta, self.sent = text[self.sent : ready], ready
        return delta

    def flush(self) -> str:
        """The held-back rest, once the answer is over."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


__all__ = ["AnswerText"]
