"""The task a recipe's `kind` names; importing this module registers every kind (`lmm`, `lcl`)."""

from __future__ import annotations

from mmbridge.config import Recipe
from mmbridge.lcl import task as _lcl  # noqa: F401  (registration)
from mmbridge.train import lmm_task as _lmm  # noqa: F401  (registration)
from mmbridge.train.task import TASKS, Task


def task_for(recipe: Recipe) -> Task:
    """A new task for `recipe` (its `kind`)."""
    return TASKS.get(recipe.kind)(recipe)
