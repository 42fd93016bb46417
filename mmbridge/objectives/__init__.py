"""Training objectives; importing this module registers them all."""

from mmbridge.objectives import blip2, captioning, concepts, croc, lcl, lexical, objects  # noqa: F401  (registration)
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective, build_objective

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "build_objective"]
