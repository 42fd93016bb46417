"""Reader for the LLaVA conversation format, with errors that name the file and record."""

from __future__ import annotations

import json
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


def check_record(record: object, where: str) -> None:
    """Raise DataError if `record` is not a well-formed LLaVA conversation record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}", "not an object")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list", "no conversations")
    img = record.get("image")
    if img is not None and not (isinstance(img, str) or (isinstance(img, list) and all(isinstance(p, str) for p in img))):
        raise DataError(f"{where}: 'image' must be a path or a list of paths", "bad image field")
    has_answer = False
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise DataError(
                f"{where}: conversations[{j}] must be {{'from': human|gpt|system, 'value': str}}", "bad turn"
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


def read_llava_json(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Read and check a LLaVA JSON list; returns (records, skipped reasons → counts).

    With `skip_bad`, malformed records are dropped and counted; otherwise the first one raises.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records, skipped = [], {}
    for i, rec in enumerate(data):
        rid = rec.get("id", i) if isinstance(rec, dict) else i
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
