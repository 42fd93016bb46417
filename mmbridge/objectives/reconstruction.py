"""Croc's reconstruction head: from the LM's final hidden states at one image's positions back to
its visual tokens (learned position embedding + one bidirectional transformer layer + linear)."""

from __future__ import annotations

import torch
from torch import nn


def default_heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class ReconstructionHead(nn.Module):
    """[n_images, num_tokens, width] hidden states → [n_images, num_tokens, out_width] predictions."""

    def __init__(self, width: int, num_tokens: int, out_width: int, heads: int | None = None):
        super().__init__()
        heads = heads or default_heads(width)
        if width % heads:
            raise ValueError(f"reconstruction head: width {width} is not divisible by heads={heads}")
        self.num_tokens = num_tokens
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                activation="gelu", batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_width)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`valid` ([n_images, T], images of their own counts padded to T ≤ num_tokens): True at real tokens;
        padding is neither attended to nor meaningful in the output."""
        if valid is None and hidden.shape[1] != self.num_tokens:
            raise ValueError(f"reconstruction head built for {self.num_tokens} tokens per image, got {hidden.shape[1]}")
        if valid is not None and hidden.shape[1] > self.num_tokens:
            raise ValueError(f"reconstruction head built for at most {self.num_tokens} tokens per image, "
                             f"got {hidden.shape[1]}")
        if valid is None:
            x = self.layer(hidden + self.position)  # no mask: bidirectional within the image
        else:
            x = self.layer(hidden + self.position[:hidden.shape[1]], src_key_padding_mask=~valid)
        return self.out(self.norm(x))
