"""Modality bridges (the survey's "interfaces"); importing this module registers them all."""

from mmbridge.models.bridges import mlp, pool_adapter  # noqa: F401  (registration)
from mmbridge.models.bridges.base import BRIDGES, Bridge, build_bridge

__all__ = ["BRIDGES", "Bridge", "build_bridge"]
