"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

Each row may have its own temperature, top-p and `torch.Generator`, so requests decoded together in one
batch draw only from their own generators and a seeded request is reproducible whatever it is batched with.
A temperature below `GREEDY_BELOW` is greedy (its `1 / t` would overflow float32 logits into NaN, which
`torch.multinomial` refuses, for the whole batch); a non-finite temperature or top-p is refused by `check`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Temperatures below this choose greedily, as in vLLM (its `_SAMPLING_EPS`).
GREEDY_BELOW = 1e-5


def per_row(value, n: int, what: str) -> list:
    """A scalar (or None) repeated for `n` rows, or a sequence of exactly `n` values."""
    if value is None or isinstance(value, (int, float, torch.Generator)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} rows")
    return values


def check(temperature: float, top_p: float) -> None:
    """Raise ValueError unless `temperature` is a finite number >= 0 and `top_p` a finite number in (0, 1]."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: expected a finite number")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r}: expected a value >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a value in (0, 1]")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (at least one), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def next_tokens(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """[B, V] logits → [B] token ids: argmax where a row's temperature is below `GREEDY_BELOW`, else a draw
    from its softmax(logits / temperature), restricted to its top-p nucleus, with the row's generator.
    Every row's settings are checked (`check`) before any is used."""
    for t, p in zip(temperature, top_p):
        check(t, p)
    tokens = logits.argmax(-1)
    for row, (t, p, g) in enumerate(zip(temperature, top_p, generators)):
        if t < GREEDY_BELOW:
            continue
        probs = top_p_filter(torch.softmax(logits[row].float() / t, -1), p)
        tokens[row] = torch.multinomial(probs, 1, generator=g)[0]
    return tokens
