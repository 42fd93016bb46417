"""The bridge interface: visual tokens from the encoder in, LM-width tokens out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.registry import BRIDGE_WRAPPERS, BRIDGES

__all__ = ["BRIDGES", "BRIDGE_WRAPPERS", "Bridge"]  # the registries live in mmbridge/registry.py


class Bridge(nn.Module):
    """Maps encoder tokens [B, T_in, D_vision] on a (rows, cols) grid to [B, num_tokens, D_lm].

    `l2_normalize` (Croc) rescales every output token to unit L2 norm.
    `fusion` is "early" (outputs fill the LM's image-token positions) or "deep" (the bridge also
    acts inside the LM's layers; see `deep.py`). A bridge with its own text side (the Q-Former)
    sets `tokenizer`; one that reads the instruction (InstructBLIP) sets `uses_instruction`. One that
    reads a whole video at once (the Perceiver Resampler) sets `reads_video`: its `project` then takes
    the frames' features with `frame_counts` and emits `num_tokens` per video; any other bridge takes a
    video's frames as consecutive images (`video_tokens`).
    """

    fusion = "early"
    tokenizer = None
    uses_instruction = False
    reads_video = False

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        grid: tuple[int, int],
        l2_normalize: bool = False,
        in_tokens: int | None = None,
    ):
        super().__init__()
        self.vision_dim, self.lm_dim, self.grid = vision_dim, lm_dim, tuple(grid)
        # tokens per image from the encoder: the grid, plus a CLS token if the encoder keeps it
        self.in_tokens = in_tokens or self.grid[0] * self.grid[1]
        self.l2_normalize = l2_normalize

    @property
    def num_tokens(self) -> int:
        """Visual tokens this bridge emits per image."""
        raise NotImplementedError

    def regrid(self, grid: tuple[int, int], in_tokens: int) -> None:
        """The encoder's grid changed (a stage's `image_size`); a bridge that cannot follow raises ValueError."""
        self.grid, self.in_tokens = tuple(grid), in_tokens

    def video_tokens(self, frames: int) -> int:
        """Visual tokens this bridge emits for a video of `frames` frames."""
        return self.num_tokens if self.reads_video else frames * self.num_tokens

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per image the LM reads (in its input, or through cross-attention)."""
        return self.num_tokens

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.project(feats, **kwargs)
        return F.normalize(out, dim=-1) if self.l2_normalize else out
