"""Flamingo's Perceiver Resampler: L learned latents summarise any number of visual tokens or frames; and Qwen-VL's
position-aware one-layer compressor (LLaVA-UHD's shared compressor), `kind: qwen`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.bridges.attention import FeedForward, MultiHeadAttention, check_heads
from mmbridge.models.bridges.base import BRIDGES, Bridge


class PerceiverLayer(nn.Module):
    """Latents attend to [visual features; latents] (keys and values), then a feed-forward block."""

    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, Q, K]: which of the keys (media, then latents) each latent may read."""
        q = self.norm_latents(latents)
        latents = latents + self.attn(q, torch.cat([self.norm_media(media), q], dim=1), mask)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """[B, T, D_in] or frames [B, F, T, D_in] → [B, latents, dim], whatever T and F are (Flamingo).

    Frame f's tokens get the learned temporal embedding `frame_embed[f]` (one per frame index, up to
    `max_frames`), so the latents know the frames' order; `frame_mask` [B, F] marks real frames (a
    shorter video padded to F frames), which alone are read. With `tokens` (the encoder's tokens per
    frame), token t also gets a learned position embedding `pos_embed[t]`: Flamingo has none, but a CNN
    grid's features say little of where they are. `embed_std`: the embeddings' initial scale."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        ff_mult: int = 4,
        max_frames: int = 8,
        tokens: int | None = None,
        embed_std: float = 0.02,
    ):
        super().__init__()
        check_heads(dim, heads, "resampler")
        self.inp = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.frame_embed = nn.Parameter(torch.randn(max_frames, dim) * embed_std)  # learned temporal embeddings
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.randn(tokens, dim) * embed_std) if tokens else None

    def forward(self, feats: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        if feats.ndim == 3:  # one frame per image
            feats = feats[:, None]
        if feats.ndim != 4:
            raise ValueError(f"resampler expects [B, T, D] or [B, frames, T, D], got {tuple(feats.shape)}")
        b, f, t = feats.shape[:3]
        if f > len(self.frame_embed):
            raise ValueError(f"resampler: {f} frames exceed max_frames={len(self.frame_embed)}")
        if self.pos_embed is not None and t != len(self.pos_embed):
            raise ValueError(
                f"resampler: {t} tokens per frame, but its position embeddings are for {len(self.pos_embed)}"
            )
        media = self.inp(feats) + self.frame_embed[:f, None]
        media = (media if self.pos_embed is None else media + self.pos_embed).flatten(1, 2)
        latents = self.latents.expand(b, -1, -1)
        mask = None
        if frame_mask is not None:  # keys: each real frame's tokens, and every latent
            keys = torch.cat([frame_mask.repeat_interleave(t, dim=1), frame_mask.new_ones(b, len(self.latents))], 1)
            mask = keys[:, None].expand(b, len(self.latents), -1)
        for layer in self.layers:
            latents = layer(media, latents, mask)
        return self.norm(latents)


def sincos_2d(dim: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """MAE's 2D sin-cos table [rows·cols, dim], row-major: the first half of the channels encodes a token's column,
    the second its row, each half as [sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64, device=device),
        torch.arange(cols, dtype=torch.float64, device=device),
        indexing="ij",
    )

    def half(p):
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([half(c), half(r)], dim=1).float()


def resized(table: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """A side×side position table [side², D] resized (bicubic) to `grid`, as Qwen-VL's `get_abs_pos`."""
    if tuple(grid) == (side, side):
        return table
    square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False)[0].flatten(1).T


class QwenResampler(nn.Module):
    """One cross-attention layer: `queries` learned queries (a square grid) with their 2D sin-cos positions read
    the visual tokens, whose keys carry the same table resized to the input's grid (Qwen-VL's 256-query adapter;
    LLaVA-UHD's compressor for slices of any shape). Values carry no positions."""

    def __init__(self, kv_dim: int, dim: int, queries: int = 256, heads: int = 8):
        super().__init__()
        check_heads(dim, heads, "resampler")
        self.side = math.isqrt(queries)
        if self.side * self.side != queries:
            raise ValueError(f"resampler (kind qwen): queries must be a square number, got {queries}")
        sincos_2d(dim, 1, 1)  # fail early on a width the table cannot take
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.zeros(queries, dim), std=0.02))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q, self.ln_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        for lin in (self.kv_proj, self.attn.out_proj):
            if isinstance(lin, nn.Linear):
                nn.init.trunc_normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.attn.out_proj.bias)

    def positions(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        table = sincos_2d(self.query.shape[1], self.side, self.side, like.device)
        return resized(table, self.side, grid).to(like.dtype)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, rows·cols, kv_dim] on `grid` → [B, queries, dim]."""
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + self.positions((self.side, self.side), x)
        out, _ = self.attn(q.expand(x.shape[0], -1, -1), x + self.positions(grid, x), x, need_weights=False)
        return out


def group_frames(feats: torch.Tensor, frame_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive frames' features [N, T, D] of videos of `frame_counts` [V] frames (summing to N) →
    [V, F, T, D], each video padded to the longest F with its last frame, and the real frames [V, F]."""
    counts = frame_counts.to(feats.device)
    longest = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(longest, device=feats.device)
    real = offsets[None] < counts[:, None]
    index = starts[:, None] + torch.minimum(offsets[None], counts[:, None] - 1)
    return feats[index], real


@BRIDGES.register("resampler")
class ResamplerBridge(Bridge):
    """Perceiver Resampler, then a linear layer to the LM width: `latents` tokens per image, or per video
    (`frame_counts` frames each, read together with their temporal embeddings; `max_frames` at most).

    `kind: qwen`: Qwen-VL's compressor instead (`QwenResampler`, `latents` queries on a square grid, width `dim`,
    default the LM's), then a LayerNorm and a bias-free projection as Qwen-VL's `ln_post` and `proj`; each view's
    keys get positions for its own grid (`grid=`, LLaVA-UHD's slices), and video frames are read as images
    (`depth`, `ff_mult`, `max_frames` and `embed_std` are the Perceiver's and do not apply)."""

    reads_video = True
    reads_grid = False

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim: int | None = None,
        ff_mult: int = 4,
        max_frames: int = 8,
        l2_normalize: bool = False,
        in_tokens=None,
        pos_embed: bool = False,
        embed_std: float = 0.02,
        kind: str = "perceiver",
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        if kind not in ("perceiver", "qwen"):
            raise ValueError(f"resampler: kind {kind!r}: expected 'perceiver' or 'qwen'")
        self.kind = kind
        if kind == "qwen":
            if pos_embed:
                raise ValueError("resampler (kind qwen): its keys carry 2D sin-cos positions; drop pos_embed")
            dim = dim or lm_dim
            self.reads_video, self.reads_grid = False, True
            self.resampler = QwenResampler(vision_dim, dim, latents, heads)
            self.ln_post = nn.LayerNorm(dim, eps=1e-6)
            self.proj = nn.Linear(dim, lm_dim, bias=False)
            return
        dim = dim or vision_dim
        self.resampler = PerceiverResampler(
            vision_dim,
            dim,
            latents,
            depth,
            heads,
            ff_mult,
            max_frames,
            tokens=self.in_tokens if pos_embed else None,
            embed_std=embed_std,
        )
        self.proj = nn.Linear(dim, lm_dim)

    def regrid(self, grid: tuple[int, int], in_tokens: int) -> None:
        if getattr(self.resampler, "pos_embed", None) is not None and in_tokens != self.in_tokens:  # qwen has none
            raise ValueError(
                f"resampler: pos_embed is learned for {self.in_tokens} tokens per frame, the new grid "
                f"{tuple(grid)} gives {in_tokens}"
            )
        super().regrid(grid, in_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.resampler.query if self.kind == "qwen" else self.resampler.latents)

    @property
    def max_frames(self) -> int:
        return len(self.resampler.frame_embed)

    def project(
        self, feats: torch.Tensor, frame_counts: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """[n_frames, T, D] features → [n_inputs, latents, lm_dim]; without `frame_counts` each frame is an image.
        `grid` (kind qwen): the views' (rows, cols), when not the encoder's own (a slice of its own size)."""
        if self.kind == "qwen":
            rows, cols = grid or self.grid
            if feats.shape[1] < rows * cols:
                raise ValueError(f"resampler: {feats.shape[1]} tokens for a {rows}x{cols} grid")
            x = feats[:, feats.shape[1] - rows * cols :]  # a leading CLS token carries no grid position
            return self.proj(self.ln_post(self.resampler(x, (rows, cols))))
        if frame_counts is None or len(frame_counts) == feats.shape[0]:  # one frame per input
            return self.proj(self.resampler(feats))
        if int(frame_counts.sum()) != feats.shape[0]:
            raise ValueError(
                f"frame_counts add up to {int(frame_counts.sum())} frames, but {feats.shape[0]} were encoded"
            )
        return self.proj(self.resampler(*group_frames(feats, frame_counts)))
