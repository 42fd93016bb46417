"""Reader for the LLaVA conversation format, with errors that name the file and record."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names where and why.

    `kind` is a short category used to count skipped samples.
    """

    def __init__(self, message: str, kind: str = "bad record"):
        super().__init__(message)
        self.kind = kind


def record_images(record: dict) -> list[str]:
    img = record.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def _may_hold_surrogates(value: object) -> bool:
    """One C-speed look at the whole record before walking it field by field."""
    try:
        return _has_surrogate(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return True


def decode_json(raw: bytes) -> tuple[str, bool]:
    """JSON bytes as text, undecodable bytes kept as surrogate escapes (`check_record` names them), and
    whether the value parsed from it holds no surrogate for sure: the bytes are UTF-8 and no `\\ud…`
    escape is in them (an escaped surrogate or a pair: either way the field-by-field check runs)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape"), False
    return text, b"\\ud" not in raw and b"\\uD" not in raw


def _undecodable(value: object, at: str = "") -> str | None:
    """The first field (e.g. `conversations[1].value`) whose text is not valid UTF-8: undecodable
    bytes (read with surrogateescape) or a lone surrogate escape. Such text cannot be tokenised."""
    if isinstance(value, str):
        return (at or "a value") if _has_surrogate(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{at}.{k}" if at else str(k)
            if _has_surrogate(str(k)):
                return f"the key {printable(name)}"
            if found := _undecodable(v, name):
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            if found := _undecodable(v, f"{at}[{i}]"):
                return found
    return None


def printable(value: object) -> str:
    """A record id as it should appear in a message: as is, or quoted with escapes if it holds
    newlines, control characters or undecodable bytes."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def check_record(record: object, where: str, plain: bool = False) -> None:
    """Raise DataError if `record` is not a well-formed LLaVA conversation record (`plain`: it is known
    to hold no surrogate, see `decode_json`)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}", "not an object")
    field = _undecodable(record) if not plain and _may_hold_surrogates(record) else None
    if field is not None:
        raise DataError(f"{where}: {field} is not valid UTF-8 text", "bad UTF-8")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list", "no conversations")
    img = record.get("image")
    if img is not None and not (
        isinstance(img, str) or (isinstance(img, list) and all(isinstance(p, str) for p in img))
    ):
        raise DataError(f"{where}: 'image' must be a path or a list of paths", "bad image field")
    video = record.get("video")
    if video is not None and not (
        isinstance(video, str) or (isinstance(video, list) and video and all(isinstance(p, str) for p in video))
    ):
        raise DataError(f"{where}: 'video' must be a video file or a non-empty list of frame images", "bad video field")
    has_answer = False
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise DataError(
                f"{where}: conversations[{j}] must be {{'from': human|gpt|system, 'value': str}}", "bad turn"
            )
        if ROLES[turn["from"]] == "assistant" and ("<image>" in turn["value"] or "<video>" in turn["value"]):
            mark = "<image>" if "<image>" in turn["value"] else "<video>"
            raise DataError(
                f"{where}: conversations[{j}] is a 'gpt' turn with an {mark} placeholder; "
                "images and videos belong in user turns",
                f"{mark} in an answer",
            )
        has_answer |= ROLES[turn["from"]] == "assistant"
    if not has_answer:
        raise DataError(f"{where}: no 'gpt' turn, so nothing to learn from", "no answer turn")
    n_placeholders = sum(t["value"].count("<image>") for t in convs)
    n_images = len(record_images(record))
    if n_placeholders != n_images:
        raise DataError(
            f"{where}: {n_placeholders} <image> placeholder(s) but {n_images} image(s)", "<image> count mismatch"
        )
    n_videos = sum(t["value"].count("<video>") for t in convs)
    if n_videos != (video is not None):
        raise DataError(
            f"{where}: {n_videos} <video> placeholder(s) but {int(video is not None)} video "
            "(a record holds at most one, placed once)",
            "<video> count mismatch",
        )


def read_llava_json(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Read and check a LLaVA JSON list; returns (records, skipped reasons → counts).

    With `skip_bad`, malformed records are dropped and counted; otherwise the first one raises.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    # undecodable bytes inside a string spoil only that record (it is checked below), not the file
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records, skipped = [], {}
    for i, rec in enumerate(data):
        rid = printable(rec.get("id", i)) if isinstance(rec, dict) else i
        try:
            check_record(rec, f"{path}: record {i} (id {rid})")
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.kind] = skipped.get(e.kind, 0) + 1
            continue
        rec.setdefault("id", str(i))
        records.append(rec)
    return records, skipped
