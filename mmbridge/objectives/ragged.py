"""Images with their own token counts, laid out for batched work (Croc under a tiling): padded per image, and a
random subset of each image's own tokens. No per-image Python loop."""

from __future__ import annotations

import torch


def pad_by_image(flat: torch.Tensor, counts: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum(counts), D] tokens (image after image) → [n_images, max(counts) + extra, D], zeros after each image's
    own tokens, and [n_images, max(counts) + extra] True where a token is real."""
    counts = counts.to(flat.device)
    width = int(counts.max()) + extra
    valid = torch.arange(width, device=flat.device)[None, :] < counts[:, None]
    out = flat.new_zeros(len(counts), width, flat.shape[-1])
    out[valid] = flat  # row-major: each image's tokens in order
    return out, valid


def selected_counts(counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per image, `ratio` × its count rounded half up, at least one (Croc's `num_selected` for each image)."""
    return torch.floor(ratio * counts.double() + 0.5).long().clamp(min=1)


def select_within(counts: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random subset of each image's own tokens: [n_images, m_max] indices (sorted; an image's unused
    slots hold max(counts), one past every real token) and [n_images, m_max] True where a slot is used. With one
    count for all it draws exactly what `croc.select_tokens` draws."""
    width = int(counts.max())
    keys = torch.rand(len(counts), width, device=counts.device)
    real = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    if not bool(real.all()):
        keys = keys.masked_fill(~real, 2.0)  # padding sorts last
    m = selected_counts(counts, ratio)
    order = keys.argsort(dim=1)[:, : int(m.max())]
    used = torch.arange(order.shape[1], device=counts.device)[None, :] < m[:, None]
    return order.masked_fill(~used, width).sort(dim=1).values, used
