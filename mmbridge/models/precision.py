"""Numeric precision of a training step: bf16 autocast on GPUs, fp32 on CPUs.

`auto` picks bf16 autocast on a CUDA device that supports it and plain fp32 elsewhere (on this
project's CPUs bf16 matmuls are several times slower than fp32). Weights stay fp32 either way.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device):
    """A context manager running the forward pass at `precision` (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
