"""Modality bridges (the survey's "interfaces"); importing this module registers them all."""

from mmbridge.models.bridges import (  # noqa: F401  (registration)
    gated_xattn, llama_vid, mlp, objects, pool_adapter, qformer, resampler, visual_expert)
from mmbridge.models.bridges.base import BRIDGES, Bridge, build_bridge

__all__ = ["BRIDGES", "Bridge", "build_bridge"]
