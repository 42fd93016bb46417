"""Monkey's per-window LoRA: one set of low-rank adapters per window position on a shared, frozen vision encoder.

As Monkey's `Lora_Adapter`: each adapter is `scale · B[w] A[w] dropout(x)` for the image's window `w` (A: [windows,
r, in] at Kaiming-uniform, B: [windows, out, r] at zero, no bias; `scale` a learned number per window starting at 1,
or the fixed alpha/r of plain LoRA when `alpha` is given; dropout 0.05). By default every attention layer's input
projection (q, k and v as one fused adapter, as Monkey's single `in_proj`) and output projection get one at rank 16,
and each MLP one at rank 32 (`mlp_rank`) that reads the MLP block's input (the residual stream before the
normalisation) and adds to its output: Monkey's `mlp_lora`. Before a forward, `mark(encoder, ids)` says which
window each image of the batch is (-1: no adapter, e.g. Monkey's global view); every image then gets only its own
window's update, in one batched einsum. The adapters' names hold `lora_`, so `train: {vision: lora}` trains them and
nothing else of the encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MONKEY_TARGETS = (("q_proj", "k_proj", "v_proj"), "out_proj")
MLP_BLOCKS = (("layer_norm2", "mlp"), ("norm2", "mlp"))  # (the MLP's input norm, the MLP): CLIP/SigLIP, DINOv2/ViT


class WindowLoRA(nn.Module):
    """Per-window adapters of one projection (or of several that read the same input, stacked along `out`)."""

    def __init__(
        self,
        windows: int,
        r: int,
        in_features: int,
        out_features: int,
        alpha: float | None = None,
        dropout: float = 0.05,
        device=None,
    ):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(windows, r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(windows, out_features, r, device=device))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_scale = nn.Parameter(torch.ones(windows, device=device)) if alpha is None else None
        self.fixed = None if alpha is None else alpha / r
        self.dropout = nn.Dropout(dropout)
        self.windows: torch.Tensor | None = None  # [B] window per image, set by `mark`
        self.users = 1  # projections reading this adapter's input (3 for fused q, k, v)
        self._down: tuple | None = None  # (input, A·dropout(input), uses so far), shared by fused projections

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A[w] · dropout(x) per image, [B, T, r]; computed once for an input that several projections read (one
        dropout mask for them, as for Monkey's fused in_proj), and let go after the last of them."""
        if self._down is not None and self._down[0] is x:
            _, out, uses = self._down
        else:
            flat = self.dropout(x).reshape(x.shape[0], -1, x.shape[-1])
            out, uses = torch.einsum("bti,bri->btr", flat, self.lora_A[self.windows.clamp(min=0)].to(x.dtype)), 0
        self._down = (x, out, uses + 1) if uses + 1 < self.users else None  # held no longer than needed
        return out

    def delta(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor | None:
        """The update for `x` ([B, ..., in]) in output rows `rows` (all: None); None with no windows marked."""
        ids = self.windows
        if ids is None:
            return None
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"per-window LoRA: {ids.shape[0]} window ids for a batch of {x.shape[0]} images")
        w = ids.clamp(min=0)
        b = self.lora_B[w] if rows is None else self.lora_B[w, rows]
        up = torch.einsum("btr,bor->bto", self.down(x), b.to(x.dtype))
        scale = (ids >= 0).to(x.dtype) * (self.lora_scale[w].to(x.dtype) if self.fixed is None else self.fixed)
        return (scale.view(-1, 1, 1) * up).reshape(*x.shape[:-1], -1)

    def forget(self) -> None:
        self._down = None


class WindowLoRALinear(nn.Module):
    """`base(x)` plus its rows of a (possibly fused) WindowLoRA's update; the adapter lives on the parent module."""

    def __init__(self, base: nn.Linear, adapter: WindowLoRA, rows: slice | None = None):
        super().__init__()
        self.base, self.rows = base, rows
        self._adapter = [adapter]  # registered once, on the parent (so fused projections share it)

    @property
    def adapter(self) -> WindowLoRA:
        return self._adapter[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.adapter.delta(x, self.rows)
        return out if delta is None else out + delta


class NormTap(nn.Module):
    """The MLP block's normalisation, handing its input (the residual stream) to the block's MLP adapter."""

    def __init__(self, norm: nn.Module, mlp: WindowMLP):
        super().__init__()
        self.norm, self._mlp = norm, [mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._mlp[0].residual = x
        return self.norm(x)


class WindowMLP(nn.Module):
    """`mlp(h) + adapter(x)`: Monkey's `mlp_lora`, parallel to the MLP, reading the block's input x."""

    def __init__(self, mlp: nn.Module, adapter: WindowLoRA):
        super().__init__()
        self.mlp, self.lora_mlp = mlp, adapter
        self.residual: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h)
        x, self.residual = self.residual, None
        if x is None:
            raise RuntimeError("per-window LoRA: the MLP's input norm did not run before it")
        delta = self.lora_mlp.delta(x)
        return out if delta is None else out + delta


def _groups(targets) -> list[tuple[str, ...]]:
    return [(t,) if isinstance(t, str) else tuple(t) for t in targets]


def add_window_lora(
    encoder: nn.Module,
    windows: int,
    r: int = 16,
    alpha: float | None = None,
    targets=MONKEY_TARGETS,
    mlp_rank: int = 32,
    dropout: float = 0.05,
) -> int:
    """Add per-window adapters to `encoder`, in place; returns how many projections and MLPs got one.

    `targets`: linear layers by name; a list of names (e.g. [q_proj, k_proj, v_proj]) shares one adapter whose
    output rows are split among them (a fused projection). `mlp_rank` 0 adds no MLP adapters."""
    count = 0
    for group in _groups(targets):
        parents = [m for m in encoder.modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in group)]
        for parent in parents:
            bases = [getattr(parent, n) for n in group]
            if len({b.in_features for b in bases}) != 1:
                raise ValueError(f"model.tiling.targets: {list(group)} read inputs of different widths")
            adapter = WindowLoRA(
                windows,
                r,
                bases[0].in_features,
                sum(b.out_features for b in bases),
                alpha,
                dropout,
                bases[0].weight.device,
            )
            adapter.users = len(group)
            setattr(parent, "lora_" + "_".join(group), adapter)
            start = 0
            for n, b in zip(group, bases):
                rows = None if len(group) == 1 else slice(start, start + b.out_features)
                setattr(parent, n, WindowLoRALinear(b, adapter, rows))
                start += b.out_features
            count += 1
    if not count:
        raise ValueError(
            f"model.tiling.mode=monkey: no linear layers named {list(targets)} in the vision encoder "
            "(set model.tiling.targets)"
        )
    if mlp_rank:
        for block in list(encoder.modules()):
            found = next(((n, m) for n, m in MLP_BLOCKS if hasattr(block, n) and hasattr(block, m)), None)
            if found is None or isinstance(getattr(block, found[1]), WindowMLP):
                continue
            norm, mlp = getattr(block, found[0]), getattr(block, found[1])
            width = next(p for p in norm.parameters()).shape[0]
            wrapped = WindowMLP(
                mlp, WindowLoRA(windows, mlp_rank, width, width, alpha, dropout, next(mlp.parameters()).device)
            )
            setattr(block, found[1], wrapped)
            setattr(block, found[0], NormTap(norm, wrapped))
            count += 1
    return count


def _adapters(encoder: nn.Module) -> list[WindowLoRA]:
    return [m for m in encoder.modules() if isinstance(m, WindowLoRA)]


def mark(encoder: nn.Module, ids: torch.Tensor | None) -> None:
    """Which window each image of the next forward is (-1: none); None turns the adapters off."""
    for m in _adapters(encoder):
        m.windows = ids
        m.forget()


def has_window_lora(encoder: nn.Module) -> bool:
    return bool(_adapters(encoder))
