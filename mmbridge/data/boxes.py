"""Boxes written as text: one reader for training answers and for evaluated predictions.

A box is a group of four numbers "[x0, y0, x1, y1]" (or "(...)", commas or spaces between), in one of two
forms: integers in [0, 999] ("[503, 71, 726, 941]", the built-in world's and Qwen-VL's form) or decimals in
[0, 1] ("[0.50, 0.07, 0.73, 0.94]", LLaVA-1.5's and Shikra's RefCOCO form). Both are read to the integer
form (a decimal d as round(1000·d), 1.0 as 999). A group in any other form (negative numbers, integers
above 999, decimals above 1) raises `BoxFormatError`; a reversed box (x0 > x1 or y0 > y1) is no box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INTEGER, DECIMAL = "integer", "decimal"
FORMS = "integers in [0, 999] ('[503, 71, 726, 941]') or decimals in [0, 1] ('[0.503, 0.071, 0.726, 0.941]')"

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_SEP = r"(?:,|\s)"
_BODY = _SEP.join([_NUM] * 4)
BOX_PATTERN = re.compile(rf"\[{_BODY}\]|\({_BODY}\)")


class BoxFormatError(ValueError):
    """A box-like group of four numbers in a form that is not supported; `form` says what was found."""

    def __init__(self, text: str, form: str, supported: str = f"the supported forms are {FORMS}", where: str = ""):
        super().__init__(f"{where}box {text!r} holds {form}; {supported}")
        self.text, self.form = text, form


@dataclass(frozen=True)
class TextBox:
    """A box read from text: `box` in the integer form, the `form` it was written in, and its `text`."""

    box: tuple[int, int, int, int]
    form: str
    text: str


def read_values(raw: list[str], text: str = "") -> TextBox | None:
    """Four coordinates as written → the box, None if reversed; BoxFormatError for an unsupported form."""
    text = text or "[" + ", ".join(raw) + "]"
    if any(r.startswith("-") for r in raw):
        raise BoxFormatError(text, "negative numbers")
    if any("." in r for r in raw):
        values = [float(r) for r in raw]
        if max(values) > 1:
            raise BoxFormatError(text, f"decimals above 1 (up to {max(values):g})")
        box, form = tuple(min(999, round(v * 1000)) for v in values), DECIMAL
    else:
        box, form = tuple(int(r) for r in raw), INTEGER
        if max(box) > 999:
            raise BoxFormatError(text, f"integers above 999 (up to {max(box)}; pixel coordinates?)")
    if box[0] > box[2] or box[1] > box[3]:
        return None
    return TextBox(box, form, text)


def read_match(match: re.Match) -> TextBox | None:
    return read_values([g for g in match.groups() if g is not None], match.group(0))


def find_boxes(text: str) -> list[TextBox]:
    """Every box in `text`, in order (reversed ones left out); BoxFormatError at the first unsupported one."""
    return [b for b in map(read_match, BOX_PATTERN.finditer(text)) if b is not None]


def box_of(values) -> TextBox | None:
    """A box given as four numbers (e.g. a record's "box" field), read by the same rules as written ones."""
    raw = [format(v, ".6f") if isinstance(v, float) else str(v) for v in values]
    if len(raw) != 4:
        raise BoxFormatError(str(list(values)), f"{len(raw)} numbers, not 4")
    return read_values(raw, str(list(values)))
