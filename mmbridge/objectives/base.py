"""The objective interface: what a stage optimises, given the composite model and a batch."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mmbridge.loss_norm import target_total
from mmbridge.models import moe
from mmbridge.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective")


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

    def __call__(self, model: nn.Module, batch: dict, *args, sum_ranks=None, **kwargs) -> LossOutput:
        """`forward` under the model's precision (bf16 autocast on a GPU; fp32 on a CPU by default). `sum_ranks`
        (under torchrun: a tensor's sum over the processes, each holding a slice of the micro-batch) lets losses
        over the whole micro-batch, such as MoE balancing, be computed as one process would."""
        with model.autocast() if hasattr(model, "autocast") else contextlib.nullcontext():
            out = super().__call__(model, batch, *args, **kwargs)
        return with_moe_balance(out, model, batch, kwargs.get("normalizer", args[0] if args else None), sum_ranks)


def with_moe_balance(out: LossOutput, model: nn.Module, batch: dict, normalizer, sum_ranks=None) -> LossOutput:
    """MoE-tuning: add the MoE layers' balancing loss times `moe.aux_weight`, weighed by this micro-batch's share
    of the step's targets (so the step's total is the target-weighted mean), and log it as `loss_moe_aux`.

    With `sum_ranks`, the loss is that of the whole micro-batch, not of this process's slice: the layers' tallies
    and the slices' targets are summed over the processes (one collective). Its value here is weighed by this
    slice's targets (the trainer sums the processes' losses), its gradient, which reaches this slice's tokens
    only, by the whole micro-batch's; so loss and gradients are one process's."""
    lm = getattr(model, "lm", None)
    weight = getattr(lm, "moe_aux_weight", 0.0)
    mine = moe.tallies(lm) if weight else None
    if mine is None:
        return out
    targets = target_total(batch)
    both = torch.cat([mine.detach().flatten(), mine.new_tensor([targets])])
    if sum_ranks is not None:
        both = sum_ranks(both)
    aux = moe.balancing_over(mine, both[:-1].view_as(mine))
    share, pull = (targets / normalizer, both[-1] / normalizer) if normalizer else (1.0, 1.0)
    out.loss = out.loss + weight * (aux * pull - aux.detach() * (pull - share))  # value: aux * share
    out.terms["moe_aux"] = (aux * share).detach()
    return out


def build_objective(cfg: dict, model: nn.Module) -> Objective:
    cfg = dict(cfg)
    name = cfg.pop("name", "lm")
    try:
        return OBJECTIVES.get(name)(model, **cfg)
    except TypeError as e:
        raise ValueError(f"objective {name}: {e}") from e
