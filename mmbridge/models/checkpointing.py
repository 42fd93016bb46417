"""Gradient (activation) checkpointing of repeated blocks: the LM's decoder layers and a vision
tower's transformer layers keep only their inputs and recompute the rest in the backward pass.

Unlike Hugging Face's switch, this also works on parts in eval mode: a frozen LM below a trained
bridge still carries gradients, and its activations are what fill memory. A block is recomputed
only when gradients flow through it; a frozen encoder under `no_grad` runs as usual.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _carries_grad(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    tensors = [*args, *kwargs.values()]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors) or any(
        p.requires_grad for p in block.parameters()
    )


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if not (torch.is_grad_enabled() and _carries_grad(self, args, kwargs)):
        return forward(self, *args, **kwargs)
    # a KV cache written in the forward would be written again by the recomputation
    kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block (an instance-level `forward`; weights and state-dict keys unchanged)."""
    n = 0
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
            n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(vars(block).get("forward"), "__func__", None) is _checkpointed_forward


def vision_blocks(vision: nn.Module) -> list[nn.Module]:
    """The transformer layers of a Hugging Face vision tower. CNN encoders (EfficientNet) give none:
    recomputing a BatchNorm in training mode would update its running statistics twice."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vision.modules()):
        return []
    return [m for m in vision.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(model: nn.Module) -> dict[str, int]:
    """Checkpoint the decoder layers of `model.lm` and the blocks of `model.vision`; returns counts."""
    from mmbridge.models.bridges.deep import decoder_layers

    return {"lm": checkpoint_blocks(decoder_layers(model.lm)), "vision": checkpoint_blocks(vision_blocks(model.vision))}
