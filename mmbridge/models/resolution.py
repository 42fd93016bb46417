"""Changing a ViT tower's resolution between stages (Qwen-VL trains at 224, then 448).

The learned position table's patch rows are resampled as a 2D map (bicubic, as Hugging Face's on-the-fly
`interpolate_pos_encoding` does) to the new grid; CLS/register rows stay as they are. The new table replaces the old
one, so it trains and is saved at its new size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def interpolate_positions(table: torch.Tensor, n_special: int, grid: tuple[int, int]) -> torch.Tensor:
    """[n_special + g·g, D] → [n_special + rows·cols, D]: the square patch map resampled bicubically."""
    special, patches = table[:n_special], table[n_special:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise ValueError(f"position table: {patches.shape[0]} patch rows do not form a square grid")
    square = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)
    return torch.cat([special, resized], dim=0)


def resize_hf_tower(model: nn.Module, image_size: int, n_special: int) -> None:
    """Give a Hugging Face ViT-style tower (CLIP, SigLIP: `position_embedding`; ViT, DINOv2: `position_embeddings`)
    a position table for `image_size`, in place, and update the sizes it checks inputs against."""
    patch = int(model.config.patch_size)
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the tower's patch size {patch}")
    grid = (image_size // patch, image_size // patch)
    emb = next(
        (m for m in model.modules() if hasattr(m, "position_embedding") or hasattr(m, "position_embeddings")), None
    )
    if emb is None:
        raise ValueError(f"{type(model).__name__}: no position table found to interpolate")
    with torch.no_grad():
        if isinstance(getattr(emb, "position_embedding", None), nn.Embedding):
            old = emb.position_embedding
            table = interpolate_positions(old.weight, n_special, grid)
            new = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
            new.weight.copy_(table)
            new.weight.requires_grad_(old.weight.requires_grad)
            emb.position_embedding = new
            if hasattr(emb, "position_ids"):
                emb.position_ids = torch.arange(table.shape[0], device=table.device).expand(1, -1)
        elif isinstance(getattr(emb, "position_embeddings", None), nn.Parameter):
            old = emb.position_embeddings
            table = interpolate_positions(old[0], n_special, grid)
            emb.position_embeddings = nn.Parameter(table.unsqueeze(0), requires_grad=old.requires_grad)
        else:
            raise ValueError(f"{type(emb).__name__}: unsupported position table")
    for holder in (emb, getattr(emb, "patch_embeddings", None)):
        if holder is None:
            continue
        if hasattr(holder, "image_size"):
            holder.image_size = image_size if isinstance(holder.image_size, int) else (image_size, image_size)
        if hasattr(holder, "num_patches"):
            holder.num_patches = grid[0] * grid[1]
        if hasattr(holder, "num_positions"):
            holder.num_positions = grid[0] * grid[1] + n_special
    model.config.image_size = image_size


def sync_processor(model: nn.Module, processor) -> None:
    """The processor resizes images (and cuts tiles) at the model's current size and counts each image's tokens
    with the bridge's current tokens per view."""
    if processor is None or not hasattr(model, "num_image_tokens"):
        return
    processor.image_size = model.vision.image_size
    processor.num_image_tokens = model.num_image_tokens
    tiling = getattr(processor, "tiling", None)
    if tiling is not None:
        tiling.check(processor.image_size, processor.num_image_tokens)  # AnyRes still places the new grid
