"""Exact token counts of many texts without tokenising every word of them.

For a byte-level BPE tokenizer with the GPT-2 pre-tokenizer (SmolLM2, GPT-2, StarCoder; no
normalizer, added tokens that strip nothing) a text splits at its added tokens (one token each, the
stretches between them tokenised apart) and each stretch splits at every space with a printable
ASCII character on both sides: the pre-tokenizer's regex starts a new piece at such a space and no
piece reaches across it, and BPE never merges across pieces. So a text's count is the sum of its
pieces' counts, and each distinct piece (a word with its leading space) is tokenised once and
remembered. Stretches with other spacing (double spaces, spaces beside control characters, non-ASCII
text) are tokenised whole. `PieceCounter.build` returns None for any other kind of tokenizer.

ASCII texts are counted many at a time with numpy: the texts are joined, their added tokens and
spaces found in the bytes, and each piece of up to 15 bytes looked up by its bytes (two 64-bit
words and its length, an exact key) in an open table of the pieces counted so far; a piece that
is not there (new, longer, or its slot taken by another piece) is looked up in the dictionaries as
above. Either way each piece gets the count the tokenizer gives it.
"""

from __future__ import annotations

import json
import re
from itertools import islice

import numpy as np

_CLASSES = bytes(ord("s") if c == 32 else ord("p") if 33 <= c <= 126 else ord("c") for c in range(256))
_BETWEEN, _ADDED = 0xFF, 0x80  # in the joined bytes: between two texts; an added token (never in ASCII text)
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # the first k bytes
_MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


class PieceCounter:
    """Counts tokens as `len(tokenizer(text, add_special_tokens=False)["input_ids"])` would."""

    MAX_MEMO = 1_000_000  # remembered pieces; forgotten all at once past this
    MAX_TABLE = 1 << 21  # slots of the table of pieces for ASCII texts (20 bytes each)
    BULK_CHARS = 1 << 20  # characters of ASCII text counted at a time
    BULK_MIN = 8  # fewer texts are counted one by one

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        added = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
        self.added = re.compile("|".join(re.escape(t) for t in added))
        self.first: dict[str, int] = {}  # a stretch's first piece (no leading space)
        self.spaced: dict[str, int] = {}  # a later piece, keyed without its leading space
        self.whole: dict[str, int] = {}  # stretches that do not split cleanly
        # ASCII texts are counted in bulk (`_count_ascii`) unless an added token could reach across the
        # character that joins them
        self.bulk = bool(added) and not any("\xff" in t for t in added)
        self._new_table(1 << 16)

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
            self._new_table(1 << 16)
        out, unknown = [0] * len(texts), []
        if self.bulk and len(texts) >= self.BULK_MIN:
            plain = [k for k, text in enumerate(texts) if text.isascii()]
            group, chars = [], 0
            for j, k in enumerate(plain):
                group.append(k)
                chars += len(texts[k])
                if chars >= self.BULK_CHARS or j == len(plain) - 1:
                    for i, n in zip(group, self._count_ascii([texts[i] for i in group]).tolist()):
                        out[i] = n
                    group, chars = [], 0
            rest = [k for k, text in enumerate(texts) if not text.isascii()] if len(plain) < len(texts) else []
        else:
            rest = range(len(texts))
        for k in rest:
            text = texts[k]
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

    # -- ASCII texts in bulk ----------------------------------------------------------------------
    def _new_table(self, size: int) -> None:
        """An empty table of `size` slots: a piece's key (two words: its first 8 bytes, then the next 7
        and in the top byte its length + 16 if it begins a stretch) and its count; a key of 0 is no piece."""
        self._keys = np.zeros((2, size), dtype=np.uint64)
        self._counts = np.zeros(size, dtype=np.int32)
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self._filled = 0

    def _slots(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """A piece's first slot; the others of its bucket are `slot ^ 1`, `slot ^ 2`, `slot ^ 3`."""
        return (((k1 * _MIX1) ^ (k2 * _MIX2)) >> self._shift).astype(np.int64)

    def _find(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """The slot holding each key, or -1."""
        keys = self._keys
        first = self._slots(k1, k2)
        out = np.where((keys[0, first] == k1) & (keys[1, first] == k2), first, -1)
        for j in (1, 2, 3):
            again = np.flatnonzero(out < 0)
            if not len(again):
                break
            slots = first[again] ^ j
            out[again] = np.where((keys[0, slots] == k1[again]) & (keys[1, slots] == k2[again]), slots, -1)
        return out

    def _insert(self, k1: np.ndarray, k2: np.ndarray, counts: np.ndarray) -> None:
        """Put pieces not in the table yet in free slots of their buckets (a piece that finds its bucket
        full stays out: it is looked up in the dictionaries). The table doubles past a quarter full."""
        _, first = np.unique(np.stack([k1, k2], axis=1).view(np.dtype((np.void, 16))).ravel(), return_index=True)
        first = first[self._find(k1[first], k2[first]) < 0]
        k1, k2, counts = k1[first], k2[first], counts[first]
        if 4 * (self._filled + len(k1)) > len(self._counts) and len(self._counts) < self.MAX_TABLE:
            used = np.flatnonzero(self._keys[1])
            k1, k2 = np.concatenate([self._keys[0, used], k1]), np.concatenate([self._keys[1, used], k2])
            counts = np.concatenate([self._counts[used], counts])
            self._new_table(2 * len(self._counts))
        base = self._slots(k1, k2)
        for j in range(4):
            slots = base ^ j
            free = np.flatnonzero(self._keys[1, slots] == 0)
            at, put = np.unique(slots[free], return_index=True)
            put = free[put]
            self._keys[0, at], self._keys[1, at], self._counts[at] = k1[put], k2[put], counts[put]
            self._filled += len(at)
            left = np.ones(len(base), dtype=bool)
            left[put] = False
            k1, k2, counts, base = k1[left], k2[left], counts[left], base[left]

    def _count_ascii(self, texts: list[str]) -> np.ndarray:
        """`count` of ASCII texts, all at once (see the module's docstring)."""
        joined = "\x80".join(self.added.split("\xff".join(texts)))  # each added token: one byte 0x80
        raw = b"\xff" + joined.encode("latin-1") + b"\xff"
        n = len(raw)
        buf = np.frombuffer(raw + bytes(16), dtype=np.uint8)
        c = buf[:n]
        space, mark = c == 32, c >= _ADDED
        control = (c < 32) | (c == 127)
        marks = np.flatnonzero(mark)  # stretch j lies between marks[j] and marks[j + 1]
        text_of = np.cumsum(c[marks] == _BETWEEN) - 1  # the text of the stretch after each mark
        total = np.bincount(text_of[c[marks] == _ADDED], minlength=len(texts)).astype(np.int64)
        # stretches that do not split cleanly: a space at either end, or next to a space or control character
        bad = np.flatnonzero(space[:-1] & (space[1:] | control[1:] | mark[1:]) | control[:-1] & space[1:])
        bad = np.concatenate([bad, np.flatnonzero(space[1:] & mark[:-1]) + 1])
        unclean = np.zeros(len(marks), dtype=bool)
        unclean[np.searchsorted(marks, bad) - 1] = True
        whole = np.flatnonzero(unclean)
        if len(whole):
            stretches = [joined[a:b] for a, b in zip(marks[whole].tolist(), (marks[whole + 1] - 1).tolist())]
            new = sorted(set(stretches) - self.whole.keys())
            self.whole.update(zip(new, self._tokenise(new)))
            np.add.at(total, text_of[whole], [self.whole[t] for t in stretches])
        # the pieces of clean stretches: from a mark or a space to the next one
        cuts = np.flatnonzero(space | mark)
        starts, ends = cuts[:-1] + 1, cuts[1:]
        after_mark = mark[cuts[:-1]]
        stretch = np.cumsum(after_mark) - 1
        keep = np.flatnonzero((ends > starts) & ~unclean[stretch])
        starts, ends, first, stretch = starts[keep], ends[keep], after_mark[keep], stretch[keep]
        size = ends - starts
        words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf.data, strides=(1,))
        k1 = words[starts] & _MASKS[np.minimum(size, 8)]
        k2 = (size + 16 * first).astype(np.uint64) << np.uint64(56)
        longer = np.flatnonzero(size > 8)
        k2[longer] |= words[starts[longer] + 8] & _MASKS[np.minimum(size[longer] - 8, 8)]
        slots = self._find(k1, k2)
        counts = self._counts[slots].astype(np.int64)
        missed = np.flatnonzero((slots < 0) | (size > 15))
        if len(missed):
            pieces = [joined[a:b] for a, b in zip((starts[missed] - 1).tolist(), (ends[missed] - 1).tolist())]
            heads = first[missed].tolist()
            learnt = 0
            for memo, prefix, is_head in ((self.first, "", True), (self.spaced, " ", False)):
                new = sorted({p for p, h in zip(pieces, heads) if h == is_head} - memo.keys())
                memo.update(zip(new, self._tokenise([prefix + p for p in new])))
                learnt += len(new)
            first_get, spaced_get = self.first.__getitem__, self.spaced.__getitem__
            counts[missed] = [first_get(p) if h else spaced_get(p) for p, h in zip(pieces, heads)]
            if learnt:  # pieces known before and still missed have no free slot (or are too long)
                short = missed[size[missed] <= 15]
                self._insert(k1[short], k2[short], counts[short])
        # the pieces are in text order: each text's sum is a difference of running sums
        ends = np.searchsorted(text_of[stretch], np.arange(len(texts)), side="right")
        running = np.concatenate([[0], np.cumsum(counts)])
        return total + running[ends] - running[np.concatenate([[0], ends[:-1]])]
