"""InfMLLM's pool-adapter: average-pool the patch grid to P×P, keep row-major order, then MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.bridges.base import BRIDGES, Bridge
from mmbridge.models.bridges.mlp import HiddenUnits, mlp


@BRIDGES.register("pool_adapter")
class PoolAdapter(HiddenUnits, Bridge):
    """Non-overlapping s×s → P×P average pooling preserves where each token came from.

    `pos_embed: true` adds a learned embedding per pooled cell to the output: a CNN's features carry
    little absolute position (a ViT's have it from its position embeddings), and grounding needs it.
    `pos_std`: its initial scale (per coordinate)."""

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        pooled: int = 8,
        depth: int = 2,
        l2_normalize: bool = False,
        in_tokens=None,
        pos_embed: bool = False,
        norm: bool = False,
        pos_std: float = 0.02,
        act: str = "gelu",
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        self.pooled = pooled
        self._check_grid()
        self.proj = mlp(vision_dim, lm_dim, depth, norm, act)  # norm: LayerNorm on each pooled feature first
        self.pos_embed = nn.Parameter(torch.randn(pooled * pooled, lm_dim) * pos_std) if pos_embed else None

    def _check_grid(self) -> None:
        if self.in_tokens != self.grid[0] * self.grid[1]:
            raise ValueError("pool_adapter needs the patch grid only: set drop_cls: true on the vision encoder")
        rows, cols = self.grid
        if rows % self.pooled or cols % self.pooled:
            raise ValueError(
                f"pool_adapter: the encoder's {rows}x{cols} token grid is not divisible by pooled={self.pooled}; "
                f"choose pooled from the common divisors of {rows} and {cols}, or change the image size"
            )

    def regrid(self, grid: tuple[int, int], in_tokens: int) -> None:
        old = self.grid, self.in_tokens
        super().regrid(grid, in_tokens)
        try:
            self._check_grid()
        except ValueError:
            self.grid, self.in_tokens = old
            raise

    @property
    def num_tokens(self) -> int:
        return self.pooled * self.pooled

    def tokens_in(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, rows*cols, D] → the pooled cells [B, pooled², D], row-major."""
        b, t, d = feats.shape
        rows, cols = self.grid
        if t != rows * cols:
            raise ValueError(f"pool_adapter expected {rows}x{cols}={rows * cols} tokens per image, got {t}")
        grid = feats.transpose(1, 2).reshape(b, d, rows, cols)
        pooled = F.avg_pool2d(grid, kernel_size=(rows // self.pooled, cols // self.pooled))
        return pooled.flatten(2).transpose(1, 2)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.proj(self.tokens_in(feats))
        return out if self.pos_embed is None else out + self.pos_embed
