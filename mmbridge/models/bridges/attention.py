"""Small attention blocks shared by the query-based bridges (Perceiver Resampler, Flamingo's layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_heads(dim: int, heads: int, where: str) -> None:
    if dim % heads:
        raise ValueError(f"{where}: width {dim} is not divisible by heads={heads}")


class MultiHeadAttention(nn.Module):
    """Queries `x` [B, Q, D] attend to `context` [B, K, D_ctx]; `mask` [B, Q, K] is True where allowed.

    Bias-free projections as in Flamingo. Rows whose mask allows nothing output zeros.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        check_heads(dim, heads, "attention")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        empty = None
        if mask is not None:
            empty = ~mask.any(-1)  # [B, Q]: nothing to attend to
            mask = (mask | empty[..., None])[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out(out.transpose(1, 2).reshape(b, n, d))
        return out if empty is None else out.masked_fill(empty[..., None], 0.0)


class FeedForward(nn.Sequential):
    """LayerNorm → Linear → GELU → Linear (Flamingo's FFW)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )
