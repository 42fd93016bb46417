"""LLaVA's projectors: a linear layer, or Linear-GELU-Linear (LLaVA-1.5)."""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.models.bridges.base import BRIDGES, Bridge

ACTIVATIONS = {"gelu": nn.GELU, "sigmoid": nn.Sigmoid}  # names as transformers' `projector_hidden_act` spells them


def mlp(in_dim: int, out_dim: int, depth: int, norm: bool = False, act: str = "gelu") -> nn.Sequential:
    """`depth` linear layers with `act` (GELU by default) between them (depth=1 is a linear projector).

    `norm`: a LayerNorm on the input first (as InternVL's projector and BLIP-2's `ln_vision`), so that
    outputs start near the LM's embedding scale whatever the encoder's feature magnitude (a CNN head's
    features are large: unnormalised, the tokens reached ~15x the norm of SmolLM2's word embeddings).
    `act: sigmoid` makes the hidden units read as probabilities: with the lexical alignment
    (objectives/lexical.py) the first units are word detectors and the output layer starts as their words'
    embeddings."""
    if act not in ACTIVATIONS:
        raise ValueError(f"model.bridge.act: {act!r} is not one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = ([nn.LayerNorm(in_dim)] if norm else []) + [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [ACTIVATIONS[act](), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class HiddenUnits:
    """For a bridge whose last step is `proj` = [...] Linear, act, Linear: its hidden units before the
    activation (`pre_activation`) and its output layer, which the lexical alignment initialises from words."""

    proj: nn.Sequential

    @property
    def output_layer(self) -> nn.Linear | None:
        """The last Linear when an activation comes before it (depth ≥ 2), else None."""
        layers = list(self.proj)
        return layers[-1] if len(layers) >= 3 and isinstance(layers[-1], nn.Linear) else None

    def tokens_in(self, feats: torch.Tensor) -> torch.Tensor:
        """What `proj` reads for `feats` (the identity here; pooled cells for the pool-adapter)."""
        return feats

    def pre_activation(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden]: the last hidden layer's units before the activation."""
        return self.proj[:-2](self.tokens_in(feats))


@BRIDGES.register("mlp")
class MLPBridge(HiddenUnits, Bridge):
    """One LM token per encoder token (LLaVA-1.5: depth 2)."""

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        depth: int = 2,
        l2_normalize: bool = False,
        in_tokens=None,
        norm: bool = False,
        act: str = "gelu",
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        self.proj = mlp(vision_dim, lm_dim, depth, norm, act)

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
