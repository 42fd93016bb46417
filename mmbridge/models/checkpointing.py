"""Gradient (activation) checkpointing of repeated blocks: the LM's decoder layers and a vision
tower's transformer layers keep only their inputs and recompute the rest in the backward pass.

Unlike Hugging Face's switch, this also works on parts in eval mode: a frozen LM below a trained
bridge still carries gradients, and its activations are what fill memory. Under `no_grad` nothing is
saved and nothing recomputed (a frozen encoder runs as usual).

It is torch's composable `checkpoint` (`torch.distributed._composable`): forward hooks on the block, so
the module tree, parameter names and state-dict keys stay as they are (runs saved with or without it load
either way, and FSDP2's `fully_shard` composes with it). `checkpoint_wrapper` would put each block under a
`_checkpoint_wrapped_module` child and change every parameter's name. A second pre-hook, run first, keeps
the one rule of our own: a KV cache is not written by a checkpointed block (the recomputation would write it
again), as Hugging Face's layers do under their switch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed._composable import checkpoint

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers 5 names it `cache`


def _carries_grad(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    tensors = [*args, *kwargs.values()]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors) or any(
        p.requires_grad for p in block.parameters()
    )


def _no_cache_written(block: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: a block that will be recomputed gets no KV cache to write."""
    if not (torch.is_grad_enabled() and _carries_grad(block, args, kwargs)):
        return None
    if not any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return None
    return args, {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block not already checkpointed (module tree and state-dict keys unchanged); returns how many."""
    n = 0
    for block in blocks:
        if is_checkpointed(block):
            continue
        checkpoint(block)
        # prepended: runs before the checkpoint's own pre-hook, which keeps the arguments for the recomputation
        block.register_forward_pre_hook(_no_cache_written, prepend=True, with_kwargs=True)
        n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    return checkpoint.state(block) is not None


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
