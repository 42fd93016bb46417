"""The training spec a recipe's `kind` names (`TRAIN_SPECS`, filled by the modules it names)."""

from __future__ import annotations

from mmbridge.config import Recipe
from mmbridge.train.spec import TRAIN_SPECS, TrainSpec


def spec_for(recipe: Recipe) -> TrainSpec:
    """A new training spec (and the task object behind it) for `recipe` (its `kind`)."""
    return TRAIN_SPECS.get(recipe.kind)(recipe)
