"""LLaMA-VID: a context token (what the instruction asks about) and content tokens (the frame itself) per input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.bridges.base import BRIDGES
from mmbridge.models.bridges.mlp import mlp
from mmbridge.models.bridges.qformer import QFormerBridge


def content_count(content: str, grid: tuple[int, int]) -> int:
    """Content tokens per input: `mean` 1, `all` every patch, `grid:N` N×N (the grid's sides divisible by N)."""
    if content == "mean":
        return 1
    if content == "all":
        return grid[0] * grid[1]
    if content.startswith("grid:"):
        n = int(content.split(":", 1)[1])
        if n < 1 or grid[0] % n or grid[1] % n:
            raise ValueError(
                f"llama_vid: content {content!r} needs the {grid[0]}x{grid[1]} grid's sides divisible by {n}"
            )
        return n * n
    raise ValueError(f"llama_vid: content {content!r}: expected 'mean', 'all' or 'grid:N'")


@BRIDGES.register("llama_vid")
class LlamaVidBridge(QFormerBridge):
    """Per input (an image, or each frame of a video): [context token, content tokens] (LLaMA-VID).

    Context: the Q-Former reads the instruction with its learned queries and the frame; the *queries'* outputs,
    projected to the encoder width (`query_proj`), attend to the frame's patches through a key projection
    (`key_proj`): softmax(q·key_proj(X)ᵀ/√D)·X, averaged over the queries, then `context_proj` to the LM width.
    Content (`content`): the patches averaged (`mean`, one token, LLaMA-VID's video setting), all kept (`all`) or
    average-pooled to N×N (`grid:N`), through the shared projector `content_proj` (Linear-GELU-Linear at
    `depth` 2, LLaMA-VID's `mlp2x_gelu`). A leading CLS token is read by the Q-Former only, as in LLaMA-VID.
    The setting holds for every input, images and frames alike (as LLaMA-VID's single `compress_type`).
    """

    def __init__(self, vision_dim, lm_dim, grid, content: str = "mean", depth: int = 2, **kwargs):
        if kwargs.pop("instruction", True) is not True:
            raise ValueError("llama_vid: the context token is built from the instruction; instruction must be true")
        super().__init__(vision_dim, lm_dim, grid, instruction=True, **kwargs)
        content_count(content, self.grid)  # fail early on a bad setting
        self.content = content
        del self.proj
        self.query_proj = nn.Linear(self.qformer.hidden, vision_dim)
        self.key_proj = nn.Linear(vision_dim, vision_dim)
        self.context_proj = nn.Linear(vision_dim, lm_dim)
        self.content_proj = mlp(vision_dim, lm_dim, depth)

    @property
    def num_tokens(self) -> int:
        return 1 + content_count(self.content, self.grid)

    @property
    def visual_tokens(self) -> int:
        return self.num_tokens

    def regrid(self, grid: tuple[int, int], in_tokens: int) -> None:
        content_count(self.content, tuple(grid))
        super().regrid(grid, in_tokens)

    def patches(self, feats: torch.Tensor) -> torch.Tensor:
        """The grid's tokens, without a leading CLS token."""
        return feats[:, feats.shape[1] - self.grid[0] * self.grid[1] :]

    def context(self, feats: torch.Tensor, instruction_ids: torch.Tensor) -> torch.Tensor:
        """[F, T, D] features and [F, L] instruction ids → the instruction-guided feature [F, D]."""
        queries, _ = self.qformer(feats, instruction_ids, instruction_ids != self.pad_id, kind="itm")
        q = self.query_proj(queries)  # [F, N, D]
        x = self.patches(feats)
        scores = q @ self.key_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5  # [F, N, T]
        return (scores.softmax(dim=-1) @ x).mean(dim=1)

    def content_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """[F, T, D] → [F, n_content, D] before the projector."""
        x = self.patches(feats)
        if self.content == "mean":
            return x.mean(dim=1, keepdim=True)
        if self.content == "all":
            return x
        n = int(self.content.split(":", 1)[1])
        rows, cols = self.grid
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
        x = F.avg_pool2d(x, kernel_size=(rows // n, cols // n))
        return x.flatten(2).transpose(1, 2)

    def project(self, feats: torch.Tensor, instruction_ids: torch.Tensor | None = None) -> torch.Tensor:
        if instruction_ids is None:
            raise ValueError(
                "llama_vid needs instruction_ids for every frame (the context token reads the instruction)"
            )
        if instruction_ids.shape[0] != feats.shape[0]:
            raise ValueError(f"{instruction_ids.shape[0]} instructions for {feats.shape[0]} frames")
        context = self.context_proj(self.context(feats, instruction_ids))
        return torch.cat([context[:, None], self.content_proj(self.content_tokens(feats))], dim=1)
