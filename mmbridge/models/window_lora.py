"""Monkey's per-window LoRA: one low-rank adapter per window position on a shared, frozen vision encoder.

Each chosen linear layer of the encoder gets `windows` adapters (A: [windows, r, in], B: [windows, out, r], B
starting at zero). Before a forward, `mark(encoder, ids)` says which window each image of the batch is (-1: no
adapter, e.g. Monkey's global view); every image then gets only its own window's update, in one batched einsum.
The adapters' names hold `lora_`, so `train: {vision: lora}` trains them and nothing else of the encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class WindowLoRALinear(nn.Module):
    """`base(x) + scale · B[w] A[w] x` for each image's window `w` (none where w = -1)."""

    def __init__(self, base: nn.Linear, windows: int, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(windows, r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(windows, base.out_features, r, device=base.weight.device))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.windows: torch.Tensor | None = None  # [B] window per image, set by `mark`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ids = self.windows
        if ids is None:
            return out
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"per-window LoRA: {ids.shape[0]} window ids for a batch of {x.shape[0]} images")
        use = (ids >= 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        w = ids.clamp(min=0)
        a, b = self.lora_A[w].to(x.dtype), self.lora_B[w].to(x.dtype)  # [B, r, in], [B, out, r]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", flat, a), b)
        return out + self.scale * use * delta.reshape(*x.shape[:-1], -1)


def add_window_lora(encoder: nn.Module, windows: int, r: int = 4, alpha: float = 8.0,
                    targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    """Wrap every linear layer of `encoder` whose name ends in one of `targets`; returns how many."""
    found = [(name, m) for name, m in encoder.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    for name, m in found:
        parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
        setattr(parent, name.split(".")[-1], WindowLoRALinear(m, windows, r, alpha))
    if not found:
        raise ValueError(f"model.tiling.mode=monkey: no linear layer named {list(targets)} in the vision encoder "
                         "(set model.tiling.targets)")
    return len(found)


def mark(encoder: nn.Module, ids: torch.Tensor | None) -> None:
    """Which window each image of the next forward is (-1: none); None turns the adapters off."""
    for m in encoder.modules():
        if isinstance(m, WindowLoRALinear):
            m.windows = ids


def has_window_lora(encoder: nn.Module) -> bool:
    return any(isinstance(m, WindowLoRALinear) for m in encoder.modules())
