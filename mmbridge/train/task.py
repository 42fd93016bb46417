"""What one kind of training plugs into the engine: its model builder, its batches, its FLOPs, its export.

The Trainer (`train/trainer.py`) owns everything else, for every kind alike: stages, devices,
DDP/FSDP, checkpoints and exact resume, signals, the non-finite guard, metrics and MFU. A recipe's
`kind` picks the task (`lmm`: a multimodal LM; `lcl`: LCL's vision-encoder pretraining). The loss
is the stage's objective (`objectives/`), built by the engine from the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from mmbridge.config import Recipe, StageConfig
from mmbridge.registry import Registry

TASKS: Registry[type[Task]] = Registry("recipe kind")


class Task:
    """One kind of training. `build` runs once per run; `loader` once per stage (and resume)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.skipped: dict = {}  # bad samples counted while reading sources, by name and reason

    def build(self) -> tuple[nn.Module, object]:
        """The model (with `parts()`, `lm`, `vision` and `autocast()`) and its tokenizer (saved with the run)."""
        raise NotImplementedError

    def loader(self, model: nn.Module, stage: StageConfig, start_batch: int, dist) -> tuple[Iterable[dict], int | None]:
        """This process's micro-batches of `stage` from micro-batch `start_batch` on (of the global
        stream, which every process count slices alike), and the samples in one epoch (None: a stream)."""
        raise NotImplementedError

    def flops(self, model: nn.Module) -> Callable[[dict], int]:
        """Model FLOPs of one micro-batch (forward + backward), counted from the batch on the CPU."""
        from mmbridge.train.flops import StepFlops

        return StepFlops(model)

    def finish(self, trainer) -> None:
        """After the last stage, on every process (the main one writes): export what the run is for."""
