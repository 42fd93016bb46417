"""Assigning masked visual tokens to prompt-pool vectors (Croc).

The cost is the L2 distance between each selected visual token and each pool vector, computed for
the whole batch in one `torch.cdist`. `hungarian` is the paper's optimal one-to-one assignment per
image (scipy's `linear_sum_assignment`, exact); `nearest` is the many-to-one argmin of Croc's
released code.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

METHODS = ("hungarian", "nearest")


def l2_costs(tokens: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """[B, m, D] tokens and a [K, D] pool → [B, m, K] Euclidean distances (one 2D cdist)."""
    b, m, d = tokens.shape
    return torch.cdist(tokens.reshape(b * m, d), pool).view(b, m, pool.shape[0])


def check_capacity(selected: int, pool_size: int) -> None:
    """One-to-one matching needs at least as many pool vectors as selected tokens per image."""
    if selected > pool_size:
        raise ValueError(
            f"hungarian matching: {selected} tokens selected per image but the prompt pool holds only "
            f"{pool_size} vectors; lower mask_ratio, raise pool_size, or use matching: nearest"
        )


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """Optimal one-to-one assignment per image: [B, m, K] costs (m ≤ K) → [B, m] pool indices.

    scipy solves each image's m × K problem exactly (on float64 costs); it holds the GIL, so a
    thread pool does not help, and at Croc's sizes it is milliseconds per batch anyway.
    """
    b, m, k = cost.shape
    check_capacity(m, k)
    costs = cost.detach().to("cpu", torch.float64).numpy()
    cols = np.empty((b, m), dtype=np.int64)
    for i in range(b):  # one solver call per image; the costs were computed batched
        rows, cols_i = linear_sum_assignment(costs[i])
        cols[i, rows] = cols_i
    return torch.from_numpy(cols).to(cost.device)


def nearest(cost: torch.Tensor) -> torch.Tensor:
    """Many-to-one: each token takes its closest pool vector ([B, m, K] → [B, m])."""
    return cost.argmin(dim=-1)


def match(
    tokens: torch.Tensor, pool: torch.Tensor, method: str = "hungarian", used: torch.Tensor | None = None
) -> torch.Tensor:
    """Pool index for every token of `tokens` [B, m, D] (no gradient flows through the choice). `used` ([B, m]):
    the slots that hold a token; an unused slot costs the same for every pool vector, so it leaves the used
    slots' optimal assignment as it is (its own index is meaningless)."""
    if method not in METHODS:
        raise ValueError(f"matching {method!r}: expected one of {METHODS}")
    if method == "hungarian":
        check_capacity(tokens.shape[1], pool.shape[0])
    with torch.no_grad():
        cost = l2_costs(tokens.detach().float(), pool.detach().float())
        if used is not None:
            cost = cost.masked_fill(~used[..., None], 0.0)
    return hungarian(cost) if method == "hungarian" else nearest(cost)
