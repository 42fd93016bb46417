"""How answer tokens are weighted in the loss: per token (the default) or per sample.

With ``token`` every labelled token of a step weighs the same, so a task with long answers
(a grounding box is ~17 tokens) drowns one with one-word answers (VQA). With ``sample`` each
sample's answer tokens share a weight of 1, so every sample counts the same whatever its length;
the step's normaliser is then the number of samples with a target instead of the token count.
"""

from __future__ import annotations

import torch

from mmbridge.core import IGNORE


def sample_weights(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1] weights on the next-token targets `labels[:, 1:]`: 1 / (the sample's target count).

    A sample is a row, or with packing (`segment_ids`, 0 for padding) one segment of a row."""
    keep = labels[:, 1:] != IGNORE
    seg = segment_ids[:, 1:] if segment_ids is not None else torch.ones_like(labels[:, 1:])
    rows, span = labels.shape[0], labels.shape[1] + 1  # segment ids are below span: no device sync for a max
    key = (torch.arange(rows, device=labels.device)[:, None] * span + seg)[keep]
    counts = torch.zeros(rows * span, device=labels.device)
    counts.index_add_(0, key, torch.ones_like(key, dtype=torch.float))
    weights = torch.zeros(keep.shape, device=labels.device)
    weights[keep] = 1.0 / counts[key]
    return weights


def target_total(batch: dict) -> float:
    """What the batch adds to the step's normaliser: its weight sum, or else its target-token count
    (read from `target_total` when the trainer counted it on the CPU, so no device sync)."""
    if "target_total" in batch:
        return float(batch["target_total"])
    if batch.get("target_weights") is not None:
        return float(batch["target_weights"].sum())
    return float((batch["labels"][:, 1:] != IGNORE).sum())
