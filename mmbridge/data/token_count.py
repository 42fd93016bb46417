"""Exact token counts of many texts without tokenising every word of them.

For a byte-level BPE tokenizer with the GPT-2 pre-tokenizer (SmolLM2, GPT-2, StarCoder; no
normalizer, added tokens that strip nothing) a text splits at its added tokens (one token each, the
stretches between them tokenised apart) and each stretch splits at every space with a printable
ASCII character on both sides: the pre-tokenizer's regex starts a new piece at such a space and no
piece reaches across it, and BPE never merges across pieces. So a text's count is the sum of its
pieces' counts, and each distinct piece (a word with its leading space) is tokenised once and
remembered. Stretches with other spacing (double spaces, spaces beside control characters, non-ASCII
text) are tokenised whole. `PieceCounter.build` returns None for any other kind of tokenizer.
"""

from __future__ import annotations

import json
import re
from itertools import islice

_CLASSES = bytes(ord("s") if c == 32 else ord("p") if 33 <= c <= 126 else ord("c") for c in range(256))


class PieceCounter:
    """Counts tokens as `len(tokenizer(text, add_special_tokens=False)["input_ids"])` would."""

    MAX_MEMO = 1_000_000  # remembered pieces; forgotten all at once past this

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        added = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
        self.added = re.compile("|".join(re.escape(t) for t in added))
        self.first: dict[str, int] = {}  # a stretch's first piece (no leading space)
        self.spaced: dict[str, int] = {}  # a later piece, keyed without its leading space
        self.whole: dict[str, int] = {}  # stretches that do not split cleanly

    @classmethod
    def build(cls, tokenizer) -> PieceCounter | None:
        """A counter for `tokenizer`, or None where splitting at spaces is not known to be exact."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE" or \
                pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        for t in tokenizer.added_tokens_decoder.values():
            if t.lstrip or t.rstrip or t.single_word or t.normalized:
                return None
        return cls(tokenizer)

    def _tokenise(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`."""
        if len(self.first) + len(self.spaced) + len(self.whole) > self.MAX_MEMO:
            self.first.clear(), self.spaced.clear(), self.whole.clear()
        out, unknown = [0] * len(texts), []
        for k, text in enumerate(texts):
            try:
                out[k] = self._count(text)
            except KeyError:  # a piece not seen yet: learnt below, with every other text's new pieces
                unknown.append(k)
        if unknown:
            self._learn([texts[k] for k in unknown])
            for k in unknown:
                out[k] = self._count(texts[k])
        return out

    def _stretches(self, text: str) -> tuple[int, list]:
        """The added tokens in `text`, and the text between them: (first piece, later pieces) where it
        splits cleanly, else (itself, None)."""
        stretches = self.added.split(text)
        out = []
        for s in stretches:
            if s:
                kinds = s.encode().translate(_CLASSES) if s.isascii() else b"s"  # non-ASCII: tokenised whole
                if kinds[0] == 115 or kinds[-1] == 115 or b"ss" in kinds or b"sc" in kinds or b"cs" in kinds:
                    out.append((s, None))
                else:
                    parts = s.split(" ")
                    out.append((parts[0], islice(parts, 1, None)))
        return len(stretches) - 1, out

    def _count(self, text: str) -> int:
        first, spaced, whole = self.first, self.spaced, self.whole
        n, stretches = self._stretches(text)
        for head, rest in stretches:
            n += whole[head] if rest is None else first[head] + sum(map(spaced.__getitem__, rest))
        return n

    def _learn(self, texts: list[str]) -> None:
        new_first, new_spaced, new_whole = set(), set(), set()
        for text in texts:
            for head, rest in self._stretches(text)[1]:
                if rest is None:
                    new_whole.add(head)
                else:
                    new_first.add(head)
                    new_spaced.update(rest)
        for memo, new, prefix in ((self.first, new_first, ""), (self.spaced, new_spaced, " "),
                                  (self.whole, new_whole, "")):
            new = sorted(new - memo.keys())
            memo.update(zip(new, self._tokenise([prefix + p for p in new])))
