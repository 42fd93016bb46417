"""Flamingo's gated cross-attention dense layers, inserted before every k-th layer of a frozen LM."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mmbridge.models.bridges.attention import FeedForward, MultiHeadAttention
from mmbridge.models.bridges.base import BRIDGES
from mmbridge.models.bridges.deep import DeepFusionBridge, FusionContext, decoder_layers, image_slots
from mmbridge.models.bridges.resampler import PerceiverResampler


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: x += tanh(α)·xattn(x, media); x += tanh(β)·ffw(x), with α = β = 0 at first.

    A position with no image at or before it is left as it is (no cross-attention, no dense part), so
    the text before a document's first image is what the LM alone makes of it."""

    def __init__(self, dim: int, media_dim: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, context_dim=media_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen = mask.any(-1, keepdim=True)  # [B, T, 1]: an image lies at or before the position
        x = x + torch.tanh(self.attn_gate) * self.attn(self.norm(x), media, mask)
        return x + torch.tanh(self.ff_gate) * self.ff(x) * seen


@BRIDGES.register("gated_xattn")
class GatedCrossAttentionBridge(DeepFusionBridge):
    """Flamingo: a Perceiver Resampler gives `latents` visual tokens per image, which the LM reads only
    through gated cross-attention blocks before every `every`-th layer. Each image occupies one
    learned `<image>` position in the text; a token attends to the last image at or before it."""

    packable = False  # in a packed row a token would cross-attend to the previous sample's image

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        every: int = 1,
        latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim: int | None = None,
        xattn_heads: int | None = None,
        ff_mult: int = 4,
        max_frames: int = 8,
        l2_normalize: bool = False,
        in_tokens=None,
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        if every < 1:
            raise ValueError(f"gated_xattn: every must be >= 1, got {every}")
        self.every, self.xattn_heads, self.ff_mult = every, xattn_heads, ff_mult
        self.media_dim = dim or vision_dim
        self.resampler = PerceiverResampler(vision_dim, self.media_dim, latents, depth, heads, ff_mult, max_frames)
        self.marker = nn.Parameter(torch.randn(1, lm_dim) * 0.02)  # the `<image>` token's embedding
        self.blocks = nn.ModuleDict()

    @property
    def num_tokens(self) -> int:
        return 1

    @property
    def visual_tokens(self) -> int:
        return len(self.resampler.latents)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.marker.expand(feats.shape[0], 1, -1)

    def _attach(self, lm: nn.Module) -> None:
        layers = decoder_layers(lm)
        heads = self.xattn_heads or lm.config.num_attention_heads
        dtype = next(lm.parameters()).dtype
        for i in range(0, len(layers), self.every):
            block = GatedCrossAttentionBlock(self.lm_dim, self.media_dim, heads, self.ff_mult).to(dtype)
            self.blocks[str(i)] = block
            layers[i].register_forward_pre_hook(partial(_before_layer, block), with_kwargs=True)

    def context(self, feats: torch.Tensor, is_image: torch.Tensor) -> FusionContext:
        media = self.resampler(feats)  # [n_images, L, D]
        index, starts = image_slots(is_image, self.num_tokens)
        rows = starts.nonzero(as_tuple=True)[0]
        n_slots = int(starts.sum(1).max())
        n, latents, d = media.shape
        per_row = media.new_zeros(is_image.shape[0], n_slots, latents, d)
        per_row[rows, index[starts]] = media
        slot = torch.arange(n_slots, device=media.device).repeat_interleave(latents)
        return FusionContext(is_image, per_row.flatten(1, 2), slot, index)


def _before_layer(block: GatedCrossAttentionBlock, layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: run the gated block on the hidden states about to enter `layer`."""
    ctx: FusionContext | None = kwargs.get("fusion")
    if ctx is None or ctx.media is None:
        return None
    if args:
        hidden = block(args[0], ctx.media.to(args[0].dtype), ctx.xattn_mask())
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = block(
        kwargs["hidden_states"], ctx.media.to(kwargs["hidden_states"].dtype), ctx.xattn_mask()
    )
    return args, kwargs
