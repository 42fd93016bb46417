"""Croc's reconstruction head: from the LM's final hidden states at one image's positions back to
its visual tokens (learned position embedding + one bidirectional transformer layer + linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("bert", "pre_ln")


def default_heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class BertLayer(nn.Module):
    """One post-LN BERT layer: LN(x + drop(attn(x))), then LN(h + drop(W2 gelu(W1 h))); attention-probability
    dropout as BERT's. `key_padding` [B, T] True marks keys to ignore."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_padding is None else ~key_padding[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        h = self.norm1(x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(b, t, d))))
        return self.norm2(h + self.dropout(self.fc2(F.gelu(self.fc1(h)))))


class ReconstructionHead(nn.Module):
    """[n_images, num_tokens, width] hidden states → [n_images, num_tokens, out_width] predictions.

    `kind`: `bert` (Croc's: a post-LN BERT-style layer with dropout `dropout`) or `pre_ln` (a pre-LN layer and a
    final LayerNorm, no dropout)."""

    def __init__(
        self,
        width: int,
        num_tokens: int,
        out_width: int,
        heads: int | None = None,
        kind: str = "bert",
        dropout: float = 0.1,
    ):
        super().__init__()
        heads = heads or default_heads(width)
        if width % heads:
            raise ValueError(f"reconstruction head: width {width} is not divisible by heads={heads}")
        if kind not in KINDS:
            raise ValueError(f"reconstruction head {kind!r}: expected one of {KINDS}")
        self.num_tokens, self.kind = num_tokens, kind
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        if kind == "bert":
            self.layer = BertLayer(width, heads, dropout)
            self.norm = nn.Identity()  # the layer ends in its own LayerNorm
        else:
            self.layer = nn.TransformerEncoderLayer(
                width,
                heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_width)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`valid` ([n_images, T], images of their own counts padded to T ≤ num_tokens): True at real tokens;
        padding is neither attended to nor meaningful in the output."""
        if valid is None and hidden.shape[1] != self.num_tokens:
            raise ValueError(f"reconstruction head built for {self.num_tokens} tokens per image, got {hidden.shape[1]}")
        if valid is not None and hidden.shape[1] > self.num_tokens:
            raise ValueError(
                f"reconstruction head built for at most {self.num_tokens} tokens per image, got {hidden.shape[1]}"
            )
        x = hidden + self.position[: hidden.shape[1]]  # no causal mask: bidirectional within the image
        padding = None if valid is None else ~valid
        if self.kind == "bert":
            x = self.layer(x, padding)
        else:
            x = self.layer(x, src_key_padding_mask=padding)
        return self.out(self.norm(x))
