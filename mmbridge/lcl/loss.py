"""LCL's contrastive term: symmetric InfoNCE over images gathered from every process, with gradients.

Processes may hold different numbers of images: each pads to the largest count, gathers with
`torch.distributed.nn.functional.all_gather` (whose backward sends each process the gradient of its
own features, summed over processes), and drops the padding with a gathered validity mask.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_ragged(feats: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate [n_r, D] features and [n_r] masks of every process, in rank order, keeping gradients."""
    if world_size() == 1:
        return feats, valid
    from torch.distributed.nn.functional import all_gather

    # on the features' device: nccl gathers only GPU tensors, gloo CPU ones
    counts = [torch.zeros(1, dtype=torch.long, device=feats.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([feats.shape[0]], device=feats.device))
    longest = int(torch.cat(counts).max())
    pad = longest - feats.shape[0]
    feats = F.pad(feats, (0, 0, 0, pad))
    valid = F.pad(valid, (0, pad), value=False)
    masks = [torch.zeros_like(valid) for _ in range(world_size())]
    dist.all_gather(masks, valid)
    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct (tests/test_lcl.py)
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(feats)
    return torch.cat(gathered), torch.cat(masks)


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of unit vectors `image` and `text` ([n, D])."""
    if image.shape[0] == 0:
        return (image.sum() + text.sum()) * 0.0
    logits = scale * image @ text.T
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ContrastiveHead(nn.Module):
    """Projection of the LM state at `<soi>` and the learnable temperature (CLIP's init and clamp)."""

    def __init__(self, lm_width: int, latent_dim: int, init_scale: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.proj = nn.Linear(lm_width, latent_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_scale = max_scale

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, latent: torch.Tensor, soi_state: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """L_con over every process's images with context (`valid`); the same value on every process."""
        image = F.normalize(latent.float(), dim=-1)
        text = F.normalize(self.proj(soi_state).float(), dim=-1)
        image, valid_all = gather_ragged(image, valid)
        text, _ = gather_ragged(text, valid)
        return info_nce(image[valid_all], text[valid_all], self.scale)
