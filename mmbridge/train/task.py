"""A base for the objects behind a `TrainSpec` (`train/spec.py`): the recipe, and the bad samples counted while
reading its sources. A kind subclasses it, implements `build` and `loader`, overrides the hooks it needs and
registers a spec factory (`TRAIN_SPECS.register(kind)`) that returns `Task.spec()`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from mmbridge.config import Recipe, StageConfig
from mmbridge.train.spec import TrainSpec, step_flops


class Task:
    """One kind of training; each method is the `TrainSpec` field of the same name."""

    kind = "task"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.skipped: dict = {}  # bad samples counted while reading sources, by name and reason

    def build(self) -> tuple[nn.Module, object]:
        raise NotImplementedError

    def loader(self, model: nn.Module, stage: StageConfig, start_batch: int, dist) -> tuple[Iterable[dict], int | None]:
        raise NotImplementedError

    def flops(self, model: nn.Module, objective: nn.Module | None = None) -> Callable[[dict], int]:
        return step_flops(model, objective)

    def prepare_stage(self, model: nn.Module, stage: StageConfig) -> None:
        return None

    def bind_objective(self, model: nn.Module, stage: StageConfig, objective: nn.Module) -> None:
        return None

    def run_meta(self, model: nn.Module) -> dict:
        return {}

    def after_load(self, model: nn.Module) -> None:
        return None

    def finish(self, trainer) -> None:
        return None

    def take_skipped(self) -> dict:
        taken, self.skipped = self.skipped, {}
        return taken

    def spec(self) -> TrainSpec:
        return TrainSpec(
            name=self.kind,
            build=self.build,
            loader=self.loader,
            flops=self.flops,
            prepare_stage=self.prepare_stage,
            bind_objective=self.bind_objective,
            run_meta=self.run_meta,
            after_load=self.after_load,
            finish=self.finish,
            skipped=self.take_skipped,
            task=self,
        )
