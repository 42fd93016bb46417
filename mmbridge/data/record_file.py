"""Records of a LLaVA JSON list or a JSONL file, located once by their byte offsets and read on demand.

A JSON list is split into its elements by one vectorised pass over the bytes (quotes, escapes and
brackets found with numpy, a chunk at a time), so no record is parsed to find the others and the
file never sits in memory as Python objects. A file the pass cannot split cleanly is read whole by
`read_llava_json`, which raises the error the eager reader always raised (malformed JSON at line L,
column C; not a list). JSONL records are the non-blank lines.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from mmbridge.data.images import load_image
from mmbridge.data.llava import DataError, decode_json, printable, read_llava_json
from mmbridge.data.media import media_path

CHUNK = 1 << 26  # bytes scanned at a time
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 13, 32]] = True
_STRUCT = np.zeros(256, dtype=bool)
_STRUCT[[ord(c) for c in "[]{},"]] = True
_DELTA = np.zeros(256, dtype=np.int64)
_DELTA[[ord("["), ord("{")]] = 1
_DELTA[[ord("]"), ord("}")]] = -1


class MalformedFile(DataError):
    """The file as a whole cannot be read as records (not a record of it: nothing to skip)."""


class _Unsplittable(Exception):
    """The fast pass cannot split this file; the whole-file reader says why."""


def _chunks(path: Path):
    """The file's bytes, CHUNK at a time: views of the file mapped in memory (no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # closed when the last view is gone
    for base in range(0, size, CHUNK):
        yield base, np.frombuffer(data, dtype=np.uint8, count=min(CHUNK, size - base), offset=base)


def _outside(buf: np.ndarray, quotes: np.ndarray, in_str: bool) -> np.ndarray:
    """Positions in `buf` outside strings (`quotes`: the unescaped quotes; `in_str`: inside one at the start)."""
    bounds = np.concatenate([[] if in_str else [-1], quotes, [len(buf)] if (len(quotes) + in_str) % 2 == 0 else []])
    starts, ends = bounds[0::2].astype(np.int64) + 1, bounds[1::2].astype(np.int64)
    size = ends - starts
    if len(size) == 1:
        return np.arange(starts[0], ends[0])
    return np.repeat(starts - np.concatenate([[0], np.cumsum(size)[:-1]]), size) + np.arange(int(size.sum()))


def _split_list(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges [start, end) of the elements of a top-level JSON list (whitespace around them kept)."""
    marks = np.concatenate(list(_list_marks(path)))
    return (marks[:-1] + 1).astype(np.int64), marks[1:].astype(np.int64)


def _list_marks(path: Path):
    """The '[' that opens a top-level JSON list, each ',' between its elements and the closing ']', a
    chunk of the file at a time (raises _Unsplittable where the pass cannot split the file)."""
    in_str, depth, backslashes = False, 0, 0  # state carried from one chunk to the next
    opened = closed = False
    with open(path, "rb") as f:
        bom = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
    for base, buf in _chunks(path):
        if closed:
            if not _WS[buf].all():
                raise _Unsplittable
            continue
        quotes = np.flatnonzero(buf == 34)
        if len(quotes):  # a quote after an odd run of backslashes is escaped (rare: counted one by one)
            keep = np.ones(len(quotes), dtype=bool)
            maybe = np.flatnonzero((quotes > 0) & (buf[quotes - 1] == 92)).tolist()
            for j in maybe + ([0] if quotes[0] == 0 and backslashes else []):
                q, run = int(quotes[j]), 0
                while q - run > 0 and buf[q - run - 1] == 92:
                    run += 1
                keep[j] = (run + (backslashes if q == run else 0)) % 2 == 0
            quotes = quotes[keep]
        struct = _outside(buf, quotes, in_str)
        struct = struct[_STRUCT[buf[struct]]]
        delta = _DELTA[buf[struct]]
        before = depth + np.cumsum(delta) - delta
        top = before == 0  # only the list's own '[' may stand outside it, after nothing but whitespace
        lead = len(buf) if not opened and not top.any() else int(struct[0]) if not opened else 0
        if not _WS[buf[max(0, bom - base) : lead]].all():
            raise _Unsplittable
        if top.any():
            if opened or top.sum() > 1 or not top[0] or buf[struct[0]] != ord("["):
                raise _Unsplittable
            opened = True
        elif not opened:
            continue
        if (before + delta < 0).any():
            raise _Unsplittable
        at_list = before == 1
        ends = np.flatnonzero(at_list & (delta == -1))
        yield (base + struct[top | (at_list & (delta <= 0))]).astype(np.int64)
        if len(ends):
            last = int(struct[ends[0]])
            if buf[last] != ord("]") or ends[0] != len(struct) - 1 or not _WS[buf[last + 1 :]].all():
                raise _Unsplittable
            closed = True
        in_str = bool((in_str + len(quotes)) % 2)
        depth = int(depth + delta.sum())
        run = 0
        while run < len(buf) and buf[len(buf) - 1 - run] == 92:
            run += 1
        backslashes = backslashes + run if run == len(buf) else run
    if not closed:
        raise _Unsplittable


def _split_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges of the non-blank lines, and their 1-based line numbers."""
    newlines, solid = [], []
    size = 0
    for base, buf in _chunks(path):
        newlines.append(base + np.flatnonzero(buf == 10))
        solid.append(base + np.flatnonzero(~_WS[buf]))
        size = base + len(buf)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    solid = np.concatenate(solid) if solid else np.zeros(0, dtype=np.int64)
    has = np.searchsorted(solid, ends) > np.searchsorted(solid, starts)
    if len(starts) and size >= 3:  # a byte-order mark alone on the first line is blank
        with open(path, "rb") as f:
            if f.read(3) == b"\xef\xbb\xbf" and not (solid[(solid >= 3) & (solid < ends[0])]).size:
                has[0] = False
    numbers = np.flatnonzero(has) + 1
    return starts[has], ends[has], numbers.astype(np.int64)


def _whole_file_error(path: Path) -> None:
    """Raise the error the eager reader gives for this file (as a MalformedFile)."""
    try:
        read_llava_json(path)
    except DataError as e:
        raise MalformedFile(str(e)) from e
    raise MalformedFile(f"{path}: cannot locate the records of this JSON list")


class RecordFile:
    """The records of one LLaVA `.json` list or `.jsonl` file: byte ranges found once, each record
    parsed when asked for. Safe to copy into DataLoader workers (each process opens its own handle)."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike = "", lines: bool | None = None):
        self.path, self.image_root = Path(path), Path(image_root)
        if not self.path.exists():
            raise DataError(f"{path}: data file not found")
        self.name, self.files = str(path), [self.path]
        self._fd, self._pid = None, None
        self.lines = self.path.suffix == ".jsonl" if lines is None else lines
        self.kind = "jsonl" if self.lines else "json"
        self.starts = self.ends = self.numbers = None  # found by `locate`, or restored from the index cache

    def locate(self) -> None:
        """Find every record's byte range (one pass over the file), unless known already."""
        if self.starts is not None:
            return
        if self.lines:
            self.starts, self.ends, self.numbers = _split_lines(self.path)
            return
        try:
            starts, ends = _split_list(self.path)
        except _Unsplittable:
            _whole_file_error(self.path)
        self.starts, self.ends = starts, ends
        if len(starts) == 1 and not self._raw(0).strip():
            self.starts, self.ends = starts[:0], ends[:0]
        self.numbers = np.arange(len(self.starts), dtype=np.int64)

    def locate_stream(self):
        """`locate`, yielding (starts, ends, numbers) of the records found so far, a batch at a time, so that
        a caller can start on them: a JSON list's records come while its bytes are scanned (the first one
        once a second is found: a list of one blank element is empty), a JSONL file's all at the end."""
        if self.starts is not None or self.lines:
            self.locate()
            yield self.starts, self.ends, self.numbers
            return
        found, waiting, total, pending = [], [], 0, np.zeros(0, dtype=np.int64)
        try:
            for marks in _list_marks(self.path):
                marks = np.concatenate([pending, marks])
                pending = marks[-1:]
                if len(marks) < 2:
                    continue
                found.append((marks[:-1] + 1, marks[1:]))
                waiting.append(found[-1])
                total += len(marks) - 1
                if total >= 2:
                    starts, ends = (np.concatenate(x) for x in zip(*waiting))
                    waiting = []
                    yield starts, ends, np.arange(total - len(starts), total, dtype=np.int64)
        except _Unsplittable:
            _whole_file_error(self.path)
        if not found:  # cannot happen once the pass has closed the list; as `locate` would find it
            _whole_file_error(self.path)
        self.starts, self.ends = (np.concatenate(x) for x in zip(*found))
        if len(self.starts) == 1 and not self._raw(0).strip():
            self.starts, self.ends, waiting = self.starts[:0], self.ends[:0], []
        self.numbers = np.arange(len(self.starts), dtype=np.int64)
        if waiting:
            yield self.starts, self.ends, self.numbers

    def located(self) -> dict[str, np.ndarray]:
        """What `locate` found, to cache beside the index."""
        self.locate()
        return {"starts": self.starts, "ends": self.ends, "numbers": self.numbers}

    def restore(self, offsets: dict[str, np.ndarray]) -> None:
        self.starts, self.ends, self.numbers = offsets["starts"], offsets["ends"], offsets["numbers"]

    def __len__(self) -> int:
        self.locate()
        return len(self.starts)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _raw(self, i: int) -> bytes:
        if self.starts is None:
            self.locate()
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.starts[i]), int(self.ends[i])
        return os.pread(self._fd, end - start, start)

    def place(self, i: int, record: object = None) -> str:
        """Where record `i` is, for messages: `FILE: record N (id X)` (a JSON list) or `FILE: line N (id X)`."""
        unit = "line" if self.lines else "record"
        number = int(self.numbers[i])
        rid = printable(record.get("id", number)) if isinstance(record, dict) else number
        return f"{self.name}: {unit} {number} (id {rid})"

    def load(self, i: int) -> object:
        """Record `i` as parsed JSON; undecodable bytes in a string spoil only that record (checked later)."""
        return self.load_plain(i)[0]

    def load_plain(self, i: int) -> tuple[object, bool]:
        """`load(i)`, and whether the record holds no surrogate for sure (`llava.decode_json`)."""
        text, plain = decode_json(self._raw(i))
        if i == 0 and text.startswith("\ufeff"):
            text = text[1:]
        try:
            return json.loads(text), plain
        except json.JSONDecodeError as e:
            if not self.lines:  # cannot happen in a list the fast pass split; the whole-file reader says why
                _whole_file_error(self.path)
            raise DataError(
                f"{self.name}: line {int(self.numbers[i])}: malformed JSON at column {e.colno}: {e.msg}",
                "malformed JSON",
            ) from e

    def image_ref(self, i: int, name: str) -> str:
        """Where image, frame or video file `name` of record `i` is: a regular file under the image root
        (`media.media_path`; else a MediaPathError, or an ImageError for a folder, device or FIFO)."""
        return media_path(self.image_root, name)

    def image(self, i: int, name: str):
        return load_image(self.image_ref(i, name))

    def default_id(self, i: int) -> str:
        """The id of a record that has none: its position in the list (the line number in a JSONL file)."""
        return str(int(self.numbers[i]))
