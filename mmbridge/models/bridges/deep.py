"""Deep fusion: bridges that also act inside the LM's layers (Flamingo's cross-attention, CogVLM's expert).

The composite model asks such a bridge once to `attach` to a Hugging Face causal LM; the bridge
wraps the LM's layers with forward hooks (no copy of the LM's modeling code, no renamed weights)
and keeps every new parameter itself, so recipes freeze or train it as the `bridge` part. Each
forward passes a `FusionContext` as the keyword argument `fusion`, which Llama-family decoders
hand on to every layer and attention module (so gradient checkpointing replays it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmbridge.models.bridges.base import Bridge


@dataclass
class FusionContext:
    """What a deep-fusion bridge needs inside the LM for one forward pass over [B, T] positions."""

    image_mask: torch.Tensor  # [B, T] True at image-token positions of this input
    media: torch.Tensor | None = None  # [B, K, D] each row's visual tokens, image after image (cross-attention)
    media_slot: torch.Tensor | None = None  # [K] which of the row's images each media token belongs to
    media_index: torch.Tensor | None = None  # [B, T] the last image starting at or before each position; -1: none

    def __post_init__(self):
        # flat indices of the image positions, found once per forward (one device sync) and shared by every
        # layer's hooks, which then gather and scatter with fixed-shape index ops instead of boolean masks
        self.image_index = self.image_mask.flatten().nonzero().squeeze(1)
        self.has_images = self.image_index.numel() > 0

    def xattn_mask(self) -> torch.Tensor:
        """[B, T, K]: a position sees only the visual tokens of the last image before it (Flamingo)."""
        return self.media_index[..., None] == self.media_slot

    def next_token(self) -> FusionContext:
        """The context for one more generated (text) token per row, for KV-cached decoding."""
        index = None if self.media_index is None else self.media_index[:, -1:]
        return FusionContext(torch.zeros_like(self.image_mask[:, :1]), self.media, self.media_slot, index)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (`model.layers` in the Llama family)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"deep fusion: cannot find the decoder layers of {type(lm).__name__} "
            "(expected `.get_decoder().layers`, as in the Llama family)"
        )
    return layers


def image_slots(is_image: torch.Tensor, tokens_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the row's index of the last image starting at or before it (-1: none), and
    the first position of every image (row-major, which is the order images are given in)."""
    count = is_image.long().cumsum(1)
    starts = is_image & ((count - 1) % tokens_per_image == 0)
    return starts.long().cumsum(1) - 1, starts


class DeepFusionBridge(Bridge):
    """A bridge with parts inside the LM. `project` gives what fills the image-token positions;
    `context` gives what the layers need for the same forward."""

    fusion = "deep"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attached = False

    def attach(self, lm: nn.Module) -> None:
        """Wrap the layers of `lm` (once); new parameters are created here and owned by the bridge."""
        if self.attached:
            raise RuntimeError(f"{type(self).__name__} is already attached to an LM")
        self._attach(lm)
        self.attached = True

    def _attach(self, lm: nn.Module) -> None:
        raise NotImplementedError

    def context(self, feats: torch.Tensor, is_image: torch.Tensor) -> FusionContext:
        """`feats` [n_images, T_in, D_vision] from the encoder; `is_image` [B, T] image-token positions."""
        return FusionContext(is_image)
