"""LLaMA-VID: two tokens per frame, one for what the instruction asks about and one for the whole frame."""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.models.bridges.base import BRIDGES
from mmbridge.models.bridges.qformer import QFormerBridge


@BRIDGES.register("llama_vid")
class LlamaVidBridge(QFormerBridge):
    """Per frame (an image, or each frame of a video) a *context* token and a *content* token.

    Context: the instruction runs through an instruction-aware Q-Former together with its queries and the frame;
    the instruction tokens' outputs, projected to the encoder's width, are the text queries. Each text query attends
    to the frame's features, softmax(Q·Xᵀ/√d)·X; the results are averaged over the instruction's tokens and
    projected to the LM. Content: the frame's features averaged over the grid, then projected. Output per frame:
    [context, content]. Options as the Q-Former's (`init`, `queries`, `cross_every`, …); the instruction is
    always read.
    """

    def __init__(self, vision_dim, lm_dim, grid, **kwargs):
        if kwargs.pop("instruction", True) is not True:
            raise ValueError("llama_vid: the context token is built from the instruction; instruction must be true")
        super().__init__(vision_dim, lm_dim, grid, instruction=True, **kwargs)
        hidden = self.qformer.hidden
        del self.proj
        self.text_query = nn.Linear(hidden, vision_dim)
        self.context_proj = nn.Linear(vision_dim, lm_dim)
        self.content_proj = nn.Linear(vision_dim, lm_dim)

    @property
    def num_tokens(self) -> int:
        return 2

    @property
    def visual_tokens(self) -> int:
        return 2

    def context(self, feats: torch.Tensor, instruction_ids: torch.Tensor) -> torch.Tensor:
        """[F, T, D] features and [F, L] instruction ids → the frame's instruction-guided feature [F, D]."""
        mask = instruction_ids != self.pad_id
        _, text = self.qformer(feats, instruction_ids, mask, kind="itm")
        queries = self.text_query(text)  # [F, L, D]
        scores = queries @ feats.transpose(1, 2) / feats.shape[-1] ** 0.5  # [F, L, T]
        attended = scores.softmax(dim=-1) @ feats  # [F, L, D]
        weights = mask.unsqueeze(-1).to(attended.dtype)
        return (attended * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def project(self, feats: torch.Tensor, instruction_ids: torch.Tensor | None = None) -> torch.Tensor:
        if instruction_ids is None:
            raise ValueError("llama_vid needs instruction_ids for every frame (the context token reads the instruction)")
        if instruction_ids.shape[0] != feats.shape[0]:
            raise ValueError(f"{instruction_ids.shape[0]} instructions for {feats.shape[0]} frames")
        context = self.context_proj(self.context(feats, instruction_ids))
        content = self.content_proj(feats.mean(dim=1))
        return torch.stack([context, content], dim=1)
