"""The vision-encoder interface and its registry (`models/vision.py` and `models/vit.py` register encoders)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmbridge.registry import VISION_ENCODERS

Triple = tuple[float, float, float]


class VisionEncoder(nn.Module):
    """Maps pixel_values [B,3,H,W] to a row-major grid of visual tokens [B, num_tokens, hidden_size].

    ``grid`` is (rows, cols) of the token grid; token ``k`` sits at row ``k // cols``,
    column ``k % cols``. If ``num_prefix_tokens`` > 0 (an encoder asked to keep CLS or
    register tokens) those come first, followed by the grid. ``cfg`` holds the
    constructor config (including ``name``) so ``build_vision_encoder(enc.cfg)`` rebuilds it.
    """

    hidden_size: int
    image_size: int
    grid: tuple[int, int]
    image_mean: Triple
    image_std: Triple
    cfg: dict[str, Any]
    num_prefix_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """Number of output tokens per image."""
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(pixel_values.shape[-2:])}"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def resize(self, image_size: int) -> None:
        """Take `image_size` images from now on (a stage's `image_size`): ViT towers interpolate their positions."""
        if image_size != self.image_size:
            raise ValueError(
                f"{self.cfg.get('name')}: this encoder cannot change its resolution "
                f"({self.image_size} → {image_size}); a stage's image_size needs a ViT tower"
            )


def register_vision_encoder(name: str) -> Callable[[type[VisionEncoder]], type[VisionEncoder]]:
    """Class decorator adding an encoder to ``VISION_ENCODERS`` under ``name``."""
    return VISION_ENCODERS.register(name)
