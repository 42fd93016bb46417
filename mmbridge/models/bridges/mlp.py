"""LLaVA's projectors: a linear layer, or Linear-GELU-Linear (LLaVA-1.5)."""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.models.bridges.base import BRIDGES, Bridge


def mlp(in_dim: int, out_dim: int, depth: int, norm: bool = False) -> nn.Sequential:
    """`depth` linear layers with GELU between them (depth=1 is a linear projector).

    `norm`: a LayerNorm on the input first (as InternVL's projector and BLIP-2's `ln_vision`), so that
    outputs start near the LM's embedding scale whatever the encoder's feature magnitude (a CNN head's
    features are large: unnormalised, the tokens reached ~15x the norm of SmolLM2's word embeddings)."""
    layers: list[nn.Module] = ([nn.LayerNorm(in_dim)] if norm else []) + [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@BRIDGES.register("mlp")
class MLPBridge(Bridge):
    """One LM token per encoder token (LLaVA-1.5: depth 2)."""

    def __init__(self, vision_dim, lm_dim, grid, depth: int = 2, l2_normalize: bool = False, in_tokens=None,
                 norm: bool = False):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        self.proj = mlp(vision_dim, lm_dim, depth, norm)

    @property
    def num_tokens(self) -> int:
        return self.in_tokens

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)


@BRIDGES.register("linear")
class LinearBridge(MLPBridge):
    """LLaVA-1's single linear projection."""

    def __init__(self, vision_dim, lm_dim, grid, l2_normalize: bool = False, in_tokens=None):
        super().__init__(vision_dim, lm_dim, grid, depth=1, l2_normalize=l2_normalize, in_tokens=in_tokens)
