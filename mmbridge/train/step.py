"""One micro-batch's loss as the engine trains it: the stage's objective plus the model's auxiliary losses."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmbridge.loss_norm import target_total
from mmbridge.models import moe
from mmbridge.objectives.base import LossOutput


class TrainStep(nn.Module):
    """The model and the stage's objective as one module: DDP and FSDP wrap this, so parameters the objective
    owns (Croc's prompt pool) are reduced too, and objectives may call any model method.

    Its forward is the objective's loss under the model's precision (bf16 autocast on a GPU, fp32 on a CPU by
    default) plus, with `moe_weight` > 0, the MoE layers' balancing loss of that same forward. `sum_ranks` (under
    torchrun) sums a tensor over the processes, so that a loss over the whole micro-batch is one process's."""

    def __init__(self, model: nn.Module, objective: nn.Module, sum_ranks=None, moe_weight: float = 0.0):
        super().__init__()
        self.model, self.objective, self.sum_ranks, self.moe_weight = model, objective, sum_ranks, moe_weight

    def forward(self, batch: dict, normalizer: float) -> LossOutput:
        precision = self.model.autocast() if hasattr(self.model, "autocast") else contextlib.nullcontext()
        with precision:
            out = self.objective(self.model, batch, normalizer=normalizer)
        if self.moe_weight:
            out = add_moe_balance(out, self.model.lm, batch, normalizer, self.moe_weight, self.sum_ranks)
        return out


def add_moe_balance(
    out: LossOutput, lm: nn.Module, batch: dict, normalizer, weight: float, sum_ranks=None
) -> LossOutput:
    """MoE-tuning: add the MoE layers' balancing loss of the last forward times `weight`, weighed by this
    micro-batch's share of the step's targets (so the step's total is the target-weighted mean), and log it as
    `loss_moe_aux`.

    With `sum_ranks`, the loss is that of the whole micro-batch, not of this process's slice: the layers' tallies
    and the slices' targets are summed over the processes (one collective). Its value here is weighed by this
    slice's targets (the trainer sums the processes' losses), its gradient, which reaches this slice's tokens
    only, by the whole micro-batch's; so loss and gradients are one process's."""
    mine = moe.tallies(lm)
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
