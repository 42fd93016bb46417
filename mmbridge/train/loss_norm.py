"""How answer tokens are weighted in the loss: per token (the default) or per sample.

With ``token`` every labelled token of a step weighs the same, so a task with long answers
(a grounding box is ~17 tokens) drowns one with one-word answers (VQA). With ``sample`` each
sample's answer tokens share a weight of 1, so every sample counts the same whatever its length;
the step's normaliser is then the number of samples with a target instead of the token count.
"""

from __future__ import annotations

import torch

from mmbridge.data.processor import IGNORE

LOSS_NORMS = ("token", "sample")


def sample_weights(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1] weights on the next-token targets `labels[:, 1:]`: 1 / (the sample's target count).

    A sample is a row, or with packing (`segment_ids`, 0 for padding) one segment of a row."""
    keep = labels[:, 1:] != IGNORE
    seg = segment_ids[:, 1:] if segment_ids is not None else torch.ones_like(labels[:, 1:])
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    key = torch.arange(labels.shape[0], device=labels.device)[:, None] * n_seg + seg
    counts = torch.zeros(labels.shape[0] * n_seg, device=labels.device).index_add_(
        0, key[keep], torch.ones(int(keep.sum()), device=labels.device))
    weights = torch.zeros(keep.shape, device=labels.device)
    weights[keep] = 1.0 / counts[key[keep]]
    return weights


def target_total(batch: dict) -> float:
    """What the batch adds to the step's normaliser: its weight sum, or else its target-token count."""
    if batch.get("target_weights") is not None:
        return float(batch["target_weights"].sum())
    return float((batch["labels"][:, 1:] != IGNORE).sum())
