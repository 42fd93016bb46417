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
spaces found in the bytes, and each piece looked up by its bytes in a table of the pieces counted
so far: up to 7 bytes in one 64-bit word with its length (and whether it begins a stretch) in the
top byte, 8 to 15 bytes in two such words; the key is the piece itself, not a hash. A piece that is
not there (new, longer, or finding its bucket full) is looked up in the dictionaries as above.
Either way each piece gets the count the tokenizer gives it.
"""

from __future__ import annotations

import json
import re
from itertools import islice

import numpy as np

_CLASSES = bytes(ord("s") if c == 32 else ord("p") if 33 <= c <= 126 else ord("c") for c in range(256))
_BETWEEN, _ADDED = 0xFF, 0x80  # in the joined bytes: between two texts; an added token (never in ASCII text)
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)], dtype=np.uint64)  # the first k bytes of a word
_MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


class PieceCounter:
    """Counts tokens as `len(tokenizer(text, add_special_tokens=False)["input_ids"])` would."""

    MAX_MEMO = 1_000_000  # remembered pieces; forgotten all at once past this
    MAX_TABLE = 1 << 21  # slots of a table of pieces for ASCII texts
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
        self._short, self._long = _Table(1, self.MAX_TABLE), _Table(2, self.MAX_TABLE)

    @classmethod
    def build(cls, tokenizer) -> PieceCounter | None:
        """A counter for `tokenizer`, or None where splitting at spaces is not known to be exact."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        if (
            spec.get("normalizer") is not None
            or (spec.get("model") or {}).get("type") != "BPE"
            or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space")
            or not pre.get("use_regex", True)
        ):
            return None
        for t in tokenizer.added_tokens_decoder.values():
            if t.lstrip or t.rstrip or t.single_word or t.normalized:
                return None
        return cls(tokenizer)

    def _tokenise(self, texts: list[str]) -> list[int]:
        return [len(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`."""
        return self.count_with_prefixes(texts, [()] * len(texts))[0]

    def count_with_prefixes(
        self, texts: list[str], cuts: list, over: list | None = None
    ) -> tuple[list[int], list[list[int] | None]]:
        """Token counts of `texts` and of `text[:p]` for each `p` in `cuts[k]` (positions in `texts[k]`, each
        just after an added token, so the prefix splits as the text does); with `over`, those of a text of
        at most `over[k]` tokens may be left out (None)."""
        if len(self.first) + len(self.spaced) + len(self.whole) > self.MAX_MEMO:
            self.first.clear(), self.spaced.clear(), self.whole.clear()
            self._short, self._long = _Table(1, self.MAX_TABLE), _Table(2, self.MAX_TABLE)
        out, at_cuts, unknown = [0] * len(texts), [[] for _ in texts], []
        if self.bulk and len(texts) >= self.BULK_MIN:
            plain = [k for k, text in enumerate(texts) if text.isascii()]
            group, chars = [], 0
            for j, k in enumerate(plain):
                group.append(k)
                chars += len(texts[k])
                if chars >= self.BULK_CHARS or j == len(plain) - 1:
                    totals, running, first = self._count_ascii([texts[i] for i in group])
                    for i, n, j in zip(group, totals, first):
                        out[i] = n
                        if over is None or n > over[i]:
                            # a cut after the m-th added token of a text: its first m stretches and m tokens
                            ms = [len(self.added.findall(texts[i], 0, p)) for p in cuts[i]]
                            at_cuts[i] = [int(running[j + m] - running[j]) + m for m in ms]
                        else:
                            at_cuts[i] = None
                    group, chars = [], 0
            rest = [k for k, text in enumerate(texts) if not text.isascii()] if len(plain) < len(texts) else []
        else:
            rest = range(len(texts))
        for k in rest:
            text = texts[k]
            try:
                out[k], at_cuts[k] = self._count(text), [self._count(text[:p]) for p in cuts[k]]
            except KeyError:  # a piece not seen yet: learnt below, with every other text's new pieces
                unknown.append(k)
        if unknown:
            self._learn([texts[k][:p] for k in unknown for p in (len(texts[k]), *cuts[k])])
            for k in unknown:
                out[k], at_cuts[k] = self._count(texts[k]), [self._count(texts[k][:p]) for p in cuts[k]]
        return out, at_cuts

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
        for memo, new, prefix in (
            (self.first, new_first, ""),
            (self.spaced, new_spaced, " "),
            (self.whole, new_whole, ""),
        ):
            new = sorted(new - memo.keys())
            memo.update(zip(new, self._tokenise([prefix + p for p in new])))

    # -- ASCII texts in bulk ----------------------------------------------------------------------
    def _count_ascii(self, texts: list[str]) -> tuple[list[int], np.ndarray, list[int]]:
        """Counts of ASCII texts, all at once (see the module's docstring), with the running count over their
        stretches (between added tokens) and where each text's stretches begin in it."""
        joined = "\x80".join(self.added.split("\xff".join(texts)))  # each added token: one byte 0x80
        raw = b"\xff" + joined.encode("latin-1") + b"\xff"
        buf = np.frombuffer(raw + bytes(16), dtype=np.uint8)
        c = buf[: len(raw)]
        cuts = np.flatnonzero((c == 32) | (c >= _ADDED))  # the spaces and marks, which end the pieces
        at_mark = c[cuts] >= _ADDED
        stretch = np.cumsum(at_mark) - 1  # of each cut: stretch j lies between the marks j and j + 1
        marks = cuts[at_mark]
        # stretches that do not split cleanly: a space beside anything but a printable character (a
        # space, a control character, the stretch's end)
        spaces = np.flatnonzero(~at_mark)
        around = (c[cuts[spaces] - 1] - np.uint8(33) >= 94) | (c[cuts[spaces] + 1] - np.uint8(33) >= 94)
        unclean = np.zeros(len(marks), dtype=bool)
        unclean[stretch[spaces[around]]] = True
        per_stretch = np.zeros(len(marks), dtype=np.int64)  # its tokens
        whole = np.flatnonzero(unclean)
        if len(whole):
            stretches = [joined[a:b] for a, b in zip(marks[whole].tolist(), (marks[whole + 1] - 1).tolist())]
            new = sorted(set(stretches) - self.whole.keys())
            self.whole.update(zip(new, self._tokenise(new)))
            per_stretch[whole] = [self.whole[t] for t in stretches]
        # the pieces: from each cut to the next; none between two marks, and those of unclean stretches
        # are left out (their stretches are counted whole)
        starts, size, first, stretch = cuts[:-1] + 1, np.diff(cuts) - 1, at_mark[:-1], stretch[:-1]
        size[unclean[stretch]] = 0
        words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf.data, strides=(1,))
        head = words[starts]
        tag = (np.minimum(size, 15) + 16 * first).astype(np.uint64) << np.uint64(56)
        key = head & _MASKS[np.minimum(size, 7)] | tag  # exact for up to 7 bytes; a longer one finds nothing
        slots = self._short.find(key)
        counts = self._short.counts[slots]
        longer = np.flatnonzero(size > 7)
        missed = np.flatnonzero((slots < 0) & (size > 0) & (size <= 7))
        if len(longer):
            k2 = words[starts[longer] + 8] & _MASKS[np.clip(size[longer] - 8, 0, 7)] | tag[longer]
            found = self._long.find(head[longer], k2)
            counts[longer] = self._long.counts[found]
            missed = np.union1d(missed, longer[(found < 0) | (size[longer] > 15)])
        counts[size == 0] = 0
        if len(missed):
            pieces = [
                joined[a:b] for a, b in zip((starts[missed] - 1).tolist(), (starts[missed] + size[missed] - 1).tolist())
            ]
            heads = first[missed].tolist()
            first_get, spaced_get = self.first.get, self.spaced.get
            got = [first_get(p) if h else spaced_get(p) for p, h in zip(pieces, heads)]
            if None in got:  # pieces not seen yet: tokenised, remembered, and put in the tables
                for memo, prefix, is_head in ((self.first, "", True), (self.spaced, " ", False)):
                    new = sorted({p for p, h, n in zip(pieces, heads, got) if h == is_head and n is None})
                    memo.update(zip(new, self._tokenise([prefix + p for p in new])))
                counts[missed] = [first_get(p) if h else spaced_get(p) for p, h in zip(pieces, heads)]
                short, long = missed[size[missed] <= 7], missed[(size[missed] > 7) & (size[missed] <= 15)]
                self._short.insert([key[short]], counts[short])
                self._long.insert(
                    [head[long], words[starts[long] + 8] & _MASKS[size[long] - 8] | tag[long]], counts[long]
                )
            else:  # known, but too long for the tables or finding its bucket full
                counts[missed] = got
        # the pieces are in order: a stretch's tokens are a difference of running sums
        running = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        bounds = np.searchsorted(stretch, np.arange(len(marks) + 1))
        per_stretch += running[bounds[1:]] - running[bounds[:-1]]
        running = np.concatenate([[0], np.cumsum(per_stretch)])
        between = np.flatnonzero(c[marks] == _BETWEEN)  # text k: the stretches between[k] .. between[k + 1] - 1
        totals = running[between[1:]] - running[between[:-1]] + np.diff(between) - 1
        return totals.tolist(), running, between[:-1].tolist()


class _Table:
    """An open table of pieces' counts keyed by `width` 64-bit words (a key of zeros is no piece), in buckets
    of 4 slots; it doubles past a quarter full, up to `most` slots. A piece that finds its bucket full is
    not put in: it is looked up in the counter's dictionaries instead."""

    def __init__(self, width: int, most: int, size: int | None = None):
        self.width, self.most = width, most
        size = size or max(4, min(1 << 16, most))
        self.keys = np.zeros((width, size), dtype=np.uint64)
        self.counts = np.zeros(size + 1, dtype=np.int64)  # counts[-1]: what a piece not found reads (0)
        self.shift = np.uint64(64 - (size.bit_length() - 1))
        self.filled = 0

    def _slots(self, keys: tuple) -> np.ndarray:
        mixed = keys[0] * _MIX1
        if self.width == 2:
            mixed ^= keys[1] * _MIX2
        return (mixed >> self.shift).astype(np.int64)

    def find(self, *keys: np.ndarray) -> np.ndarray:
        """The slot holding each key, or -1."""
        first = self._slots(keys)
        hit = self.keys[0, first] == keys[0]
        if self.width == 2:
            hit &= self.keys[1, first] == keys[1]
        out = np.where(hit, first, -1)
        for j in (1, 2, 3):
            again = np.flatnonzero(out < 0)
            if not len(again):
                break
            slots = first[again] ^ j
            hit = self.keys[0, slots] == keys[0][again]
            if self.width == 2:
                hit &= self.keys[1, slots] == keys[1][again]
            out[again] = np.where(hit, slots, -1)
        return out

    def insert(self, keys: list[np.ndarray], counts: np.ndarray) -> None:
        """Put pieces (`keys`: `width` arrays of words) that are not in the table yet in free slots."""
        keys = np.stack(keys)
        keep = keys.any(axis=0)  # a key of zeros cannot be told from a free slot
        keys, counts = keys[:, keep], counts[keep]
        _, once = np.unique(
            np.ascontiguousarray(keys.T).view(np.dtype((np.void, 8 * self.width))).ravel(), return_index=True
        )
        keys, counts = keys[:, once], counts[once]
        new = self.find(*keys) < 0
        keys, counts = keys[:, new], counts[new]
        size = self.keys.shape[1]
        if 4 * (self.filled + len(counts)) > size and size < self.most:
            used = np.flatnonzero(self.keys.any(axis=0))
            keys, counts = (
                np.concatenate([self.keys[:, used], keys], axis=1),
                np.concatenate([self.counts[used], counts]),
            )
            self.__init__(self.width, self.most, 2 * size)
        base = self._slots(keys)
        for j in range(4):
            slots = base ^ j
            free = np.flatnonzero(~self.keys[:, slots].any(axis=0))
            at, put = np.unique(slots[free], return_index=True)
            put = free[put]
            self.keys[:, at], self.counts[at] = keys[:, put], counts[put]
            self.filled += len(at)
            left = np.ones(len(base), dtype=bool)
            left[put] = False
            keys, counts, base = keys[:, left], counts[left], base[left]
