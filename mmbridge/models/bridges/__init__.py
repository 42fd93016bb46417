"""Modality bridges (the survey's "interfaces"); importing this module registers them all."""

from mmbridge.models.bridges import (  # noqa: F401  (registration)
    gated_xattn,
    llama_vid,
    mlp,
    objects,
    pool_adapter,
    qformer,
    resampler,
    visual_expert,
)
from mmbridge.models.bridges.base import BRIDGES, Bridge
from mmbridge.models.bridges.concepts import ConceptTokens

__all__ = ["BRIDGES", "Bridge", "build_bridge"]


def build_bridge(
    cfg: dict, vision_dim: int, lm_dim: int, grid: tuple[int, int], in_tokens: int | None = None
) -> Bridge:
    """Build a bridge from a recipe dict `{"name": ..., **options}`."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    concepts = cfg.pop("concepts", None)  # {words, slots, global_token}: read out as words (bridges/concepts.py)
    try:
        bridge = BRIDGES.get(name)(vision_dim=vision_dim, lm_dim=lm_dim, grid=grid, in_tokens=in_tokens, **cfg)
    except TypeError as e:
        raise ValueError(f"model.bridge ({name}): {e}") from e
    if concepts is None:
        return bridge
    try:
        return ConceptTokens(bridge, **dict(concepts))
    except TypeError as e:
        raise ValueError(f"model.bridge.concepts: {e}") from e
