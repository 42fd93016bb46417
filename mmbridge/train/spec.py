"""What one kind of training hands the engine: a `TrainSpec`, builders and hooks and nothing else.

The engine (`train/trainer.py`) owns stages, devices, DDP/FSDP, checkpoints and exact resume, signals, the
non-finite guard, metrics and MFU for every kind alike, and reaches the kind only through these fields. A
recipe's `kind` names a spec factory in `TRAIN_SPECS` (`lmm`: a multimodal LM, `train/lmm_task.py`; `lcl`:
LCL's vision-encoder pretraining, `lcl/task.py`); the loss is the stage's objective (`objectives/`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmbridge.config import StageConfig
from mmbridge.registry import TRAIN_SPECS


def _no_stage_setup(model: nn.Module, stage: StageConfig) -> None:
    return None


def _no_binding(model: nn.Module, stage: StageConfig, objective: nn.Module) -> None:
    return None


def _no_meta(model: nn.Module) -> dict:
    return {}


def _nothing(obj) -> None:
    return None


def _nothing_skipped() -> dict:
    return {}


@dataclass(frozen=True)
class TrainSpec:
    """One kind of training, as the engine sees it.

    build: () -> (model, tokenizer), once per run (the model has `parts()`, `lm` and `autocast()`).
    loader: (model, stage, start_batch, dist) -> (this process's micro-batches from micro-batch `start_batch`
        of the global stream, the samples in one epoch or None for a stream); once per stage and resume.
    flops: (model, objective) -> a counter of one micro-batch's model FLOPs (forward + backward), read on the CPU
        (what the stage's objective runs: an objective with no LM pass, the images only).
    prepare_stage: (model, stage) -> None, first at each stage (before its train modes): what the kind changes
        between stages, such as the resolution.
    bind_objective: (model, stage, objective) -> None, once the stage's objective exists: what it reads of the
        stage's data (a vocabulary).
    run_meta: (model) -> the kind's settings saved in every checkpoint's meta, read back by `load_run`.
    after_load: (model) -> None, after a resumed run's weights (and the structure their meta names) are loaded.
    finish: (trainer) -> None, after the last stage on every process: export what the run is for.
    skipped: () -> the bad samples counted while reading sources (by name and reason) since the last call.
    task: the object behind the hooks (its datasets, processor), for tools that inspect a run being built.
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    loader: Callable[..., tuple[Iterable[dict], int | None]]
    flops: Callable[[nn.Module, nn.Module | None], Callable[[dict], int]]
    prepare_stage: Callable[..., None] = _no_stage_setup
    bind_objective: Callable[..., None] = _no_binding
    run_meta: Callable[[nn.Module], dict] = _no_meta
    after_load: Callable[[nn.Module], None] = _nothing
    finish: Callable[[Any], None] = _nothing
    skipped: Callable[[], dict] = _nothing_skipped
    task: Any = field(default=None, compare=False)


__all__ = ["TRAIN_SPECS", "TrainSpec", "step_flops"]  # TRAIN_SPECS: mmbridge/registry.py


def step_flops(model: nn.Module, objective: nn.Module | None = None) -> Callable[[dict], int]:
    """The default FLOP counter: the composite model's forward and backward, from the batch's shapes (the images'
    encoder and bridge only for an objective that runs no LM pass, `runs_lm = False`)."""
    from mmbridge.train.flops import StepFlops

    counter = StepFlops(model)
    if not getattr(objective, "runs_lm", True):
        counter.images_only()
    return counter
