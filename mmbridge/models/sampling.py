"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

Each row may have its own temperature, top-p and `torch.Generator`, so requests decoded together in one
batch draw only from their own generators and a seeded request is reproducible whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_row(value, n: int, what: str) -> list:
    """A scalar (or None) repeated for `n` rows, or a sequence of exactly `n` values."""
    if value is None or isinstance(value, (int, float, torch.Generator)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} rows")
    return values


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (at least one), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def next_tokens(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B, V] logits → [B] token ids: argmax where a row's temperature is 0, else a draw from its
    softmax(logits / temperature), restricted to its top-p nucleus, with the row's generator."""
    tokens = logits.argmax(-1)
    for row, (t, p, g) in enumerate(zip(temperature, top_p, generators)):
        if t <= 0:
            continue
        probs = top_p_filter(torch.softmax(logits[row].float() / t, -1), p)
        tokens[row] = torch.multinomial(probs, 1, generator=g)[0]
    return tokens
