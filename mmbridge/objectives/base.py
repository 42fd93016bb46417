"""The objective interface: what a stage optimises, given the composite model and a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmbridge.registry import OBJECTIVES

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "build_objective"]  # OBJECTIVES: mmbridge/registry.py


@dataclass
class LossOutput:
    loss: torch.Tensor  # already divided by the step's normaliser (target tokens across micro-batches)
    # each loss term (detached tensors, or floats), summed over the step's micro-batches and logged as loss_<name>;
    # the trainer reads them back once per step, so an objective never calls .item()
    terms: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # other values to log as they are (the last micro-batch's)


class Objective(nn.Module):
    """A stage's training objective. It may own parameters (e.g. Croc's prompt pool); these train
    with the learning rate `lr.objective` of the stage and live only as long as the stage."""

    def __init__(self, model: nn.Module):
        super().__init__()

    def forward(self, model: nn.Module, batch: dict, normalizer: float) -> LossOutput:
        raise NotImplementedError


def build_objective(cfg: dict, model: nn.Module) -> Objective:
    cfg = dict(cfg)
    name = cfg.pop("name", "lm")
    try:
        return OBJECTIVES.get(name)(model, **cfg)
    except TypeError as e:
        raise ValueError(f"objective {name}: {e}") from e
