"""A processor's image inputs: the encoder's views of each image, and where their bridge outputs go."""

from __future__ import annotations

import numpy as np
import torch

from mmbridge.data.images import preprocess
from mmbridge.data.layouts import batch_index


def image_inputs(processor, images: list) -> dict:
    """PIL images (or video frames) → `pixel_values` [views, 3, S, S]. Under a tiling whose counts vary also
    `counts` (each image's span: a length, or UHD's ids), `visual_counts` (its image-token positions),
    `visual_index` (data/layouts.py, for these images alone) and `views`; UHD's views keep their own sizes:
    `pixel_values` is zero-padded to the largest and `view_sizes` [views, 2] holds each (height, width)."""
    size, tiling, per_view = processor.image_size, processor.tiling, processor.num_image_tokens
    mean, std = processor.image_mean, processor.image_std
    if not tiling.varies:
        return {"pixel_values": preprocess(images, size, mean, std) if images else torch.zeros(0, 3, size, size)}
    views = [tiling.views(im, size) for im in images]
    index = [tiling.token_index(im.size, size, per_view) for im in images]
    flat = [v for vs in views for v in vs]
    out = {
        "views": len(flat),
        "visual_counts": [len(ix) for ix in index],
        "visual_index": batch_index(index, [len(v) for v in views], per_view),
    }
    if tiling.own_sizes:
        out["counts"] = [processor.uhd_span(im.size) for im in images]
        out["pixel_values"], out["view_sizes"] = padded_pixels(flat, mean, std)
    else:
        out["counts"] = out["visual_counts"]
        out["pixel_values"] = preprocess(flat, size, mean, std) if flat else torch.zeros(0, 3, size, size)
    return out


def padded_pixels(views: list, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of their own sizes → normalised pixels zero-padded to the largest [n, 3, H, W], and each view's
    (height, width) [n, 2]."""
    sizes = torch.tensor([(v.size[1], v.size[0]) for v in views], dtype=torch.long).reshape(-1, 2)
    h, w = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if views else (0, 0)
    out = torch.zeros(len(views), 3, h, w)
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    for k, v in enumerate(views):
        a = (np.asarray(v.convert("RGB"), dtype=np.float32) / np.float32(255.0) - m) / s
        out[k, :, : v.size[1], : v.size[0]] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return out, sizes


def pad_to(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Several [n, 3, h, w] blocks → one, each zero-padded to the largest height and width."""
    h, w = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
    return torch.cat([torch.nn.functional.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in pixels])
