"""The reply text as its tokens arrive, for streaming: pieces that, joined, equal the final reply.

The final reply is what `mmbridge chat` prints (the tokens decoded without special tokens, stripped),
cut before the first stop string. A piece is given out only once it is settled: text that may still
become a stop string, trailing space (stripped at the end) and an unfinished UTF-8 character wait.
"""

from __future__ import annotations

from collections.abc import Callable

_PARTIAL = "\ufffd"  # a byte-level tokenizer's stand-in for an unfinished UTF-8 character


class ReplyText:
    """Accumulates tokens; `push` returns the newly settled text, `finish` the rest."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] = ()):
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.sent = ""  # the text given out so far
        self.stopped = False  # a stop string was reached: the reply is complete
        self._final: str | None = None

    def _text(self) -> str:
        return self.decode(self.ids).lstrip()

    def push(self, token_id: int) -> str:
        """Add a token; the text it settled (possibly empty). After a stop string, adds nothing."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._final = True, text[: min(hits)].rstrip()
            return self._give(self._final)
        return self._give(text[: len(text) - self._held(text)].rstrip())

    def finish(self) -> str:
        """The text not yet given out; the reply is then `self.text`, kept (reading it decodes nothing, so
        another thread may read it while the decoding thread goes on)."""
        self._final = self.text
        return self._give(self._final)

    @property
    def text(self) -> str:
        return self._final if self._final is not None else self._text().rstrip()

    def _held(self, text: str) -> int:
        """How many trailing characters may still change: the longest start of a stop string, and any
        unfinished character before it."""
        held = max(
            (k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0
        )
        while held < len(text) and text[len(text) - held - 1] == _PARTIAL:
            held += 1
        return held

    def _give(self, settled: str) -> str:
        # decoding more tokens could in principle rewrite earlier text; what was given out stays given
        if not settled.startswith(self.sent):
            return ""
        piece, self.sent = settled[len(self.sent) :], settled
        return piece
