"""Training objectives, registered in `OBJECTIVES` by their modules, which the registry imports when an objective
is first looked up (`mmbridge/registry.py`)."""

from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective, build_objective

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "build_objective"]
