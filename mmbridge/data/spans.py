"""Each image's span of LM tokens: a count (the bridge's tokens per view, or its tiling's layout), or, for
LLaVA-UHD, the ids themselves (image tokens with the LM's own separators). Used by the processor."""

from __future__ import annotations

import numpy as np


def is_count(c) -> bool:
    return isinstance(c, (int, np.integer))


def lengths(default: int, counts: list | None, n: int) -> list[int]:
    """The tokens of each of `n` `<image>` placeholders: `counts` in order (a count, or a span's ids), `default`
    (the bridge's tokens per view) where none is given."""
    given = [int(c) if is_count(c) else len(c) for c in counts or ()]
    return [given[k] if k < len(given) else default for k in range(n)]


def expected(n_images: int, counts: list[int]) -> str:
    """How many image tokens were expected, for an error: "2 x 16", or "234 (88 + 76 + 70)"."""
    if len(set(counts)) <= 1:
        return f"{n_images} x {counts[0] if counts else 0}"
    return f"{sum(counts)} ({' + '.join(map(str, counts))})"


def expand_ids(ids: np.ndarray, image_id: int, default: int, counts, *more: np.ndarray):
    """Each image-token id → its image's span (`counts`: counts, or UHD's ids); `more` arrays are repeated
    along. Returns (ids, *more)."""
    at = ids == image_id
    reps = np.ones(len(ids), dtype=np.int64)
    reps[at] = lengths(default, counts, int(at.sum()))
    out = np.repeat(ids, reps)
    given = [c for c in counts or () if not is_count(c)]
    if given:
        if len(given) != len(counts) or len(given) < int(at.sum()):
            raise ValueError("give every image's span as ids, one per <image>")
        if at.any():
            out[np.repeat(at, reps)] = np.concatenate(given[: int(at.sum())])
    return (out, *(np.repeat(m, reps) for m in more))


def image_counts(processor, sizes) -> list:
    """Each image's span from its (width, height) under the processor's tiling: a count, or (UHD) its ids."""
    tiling = processor.tiling
    if not tiling.varies:
        return [processor.num_image_tokens] * len(sizes)
    if tiling.mode == "uhd":
        return [uhd_span(processor, s) for s in sizes]
    return [tiling.count(s, processor.image_size, processor.num_image_tokens) for s in sizes]


def uhd_span(processor, size) -> np.ndarray:
    """An image's LM ids under UHD: image-token ids with the LM's own "," and "\n" between slices."""
    if processor.tiling.separators and not processor._expand:
        raise ValueError(
            "model.tiling.mode=uhd with separators needs a fast tokenizer whose image token is an "
            "added token of its own"
        )
    sep = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (",", "\n")]
    return processor.tiling.span(size, processor.image_size, processor.num_image_tokens, processor.image_token_id, *sep)
