"""Fold LoRA adapters into the weights they adapt (W + B·A·alpha/r), leaving plain modules."""

from __future__ import annotations

from torch import nn


def merge_lora(module: nn.Module) -> int:
    """Merge every peft LoRA layer inside `module` in place and put its base layer back; returns how many.

    peft's own `merge` computes the update; `safe_merge` refuses a merge that makes a weight non-finite."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
