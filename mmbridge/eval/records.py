"""What a held-out record asks and what it expects: shared by generation (`evaluate.py`) and ranking (`choice.py`)."""

from __future__ import annotations

from mmbridge.data.boxes import BoxFormatError, box_of
from mmbridge.eval.metrics import parse_box


def prompt_turns(record: dict) -> list[dict]:
    """The conversation up to (not including) its last answer."""
    convs = record["conversations"]
    last = max(i for i, t in enumerate(convs) if t["from"] in ("gpt", "assistant"))
    return convs[:last]


def gold(record: dict, task: str):
    answer = record["conversations"][-1]["value"]
    if task == "caption":
        return record.get("references") or [answer]
    if task in ("vqa", "choice"):
        return record.get("answer", answer)
    if record.get("box"):  # integers in [0, 999] or decimals in [0, 1], read as answers are
        try:
            given = box_of(record["box"])
        except BoxFormatError as e:
            raise ValueError(f"record {record.get('id')}: its 'box': {e}") from e
        if given is None:
            raise ValueError(f"record {record.get('id')}: its 'box' {record['box']} is reversed (x0 > x1 or y0 > y1)")
        return list(given.box)
    box = parse_box(answer)
    if box is None:
        raise ValueError(f"record {record.get('id')}: no 'box' key and no box in its answer {answer!r}")
    return list(box)
