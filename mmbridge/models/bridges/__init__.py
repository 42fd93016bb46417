"""Modality bridges (the survey's "interfaces"), registered in `BRIDGES` (and wrappers in `BRIDGE_WRAPPERS`) by
their modules, which the registries import when a bridge is first looked up (`mmbridge/registry.py`)."""

from mmbridge.models.bridges.base import BRIDGE_WRAPPERS, BRIDGES, Bridge

__all__ = ["BRIDGES", "BRIDGE_WRAPPERS", "Bridge", "build_bridge"]


def build_bridge(
    cfg: dict, vision_dim: int, lm_dim: int, grid: tuple[int, int], in_tokens: int | None = None
) -> Bridge:
    """Build a bridge from a recipe dict `{"name": ..., **options}`; a key naming a bridge wrapper
    (`concepts: {...}`) wraps it with that key's options."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    wrappers = {k: cfg.pop(k) for k in BRIDGE_WRAPPERS.names() if k in cfg}
    try:
        bridge = BRIDGES.get(name)(vision_dim=vision_dim, lm_dim=lm_dim, grid=grid, in_tokens=in_tokens, **cfg)
    except TypeError as e:
        raise ValueError(f"model.bridge ({name}): {e}") from e
    for key, options in wrappers.items():
        if options is None:
            continue
        try:
            bridge = BRIDGE_WRAPPERS.get(key)(bridge, **dict(options))
        except TypeError as e:
            raise ValueError(f"model.bridge.{key}: {e}") from e
    return bridge
