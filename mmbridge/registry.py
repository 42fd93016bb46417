"""Name → constructor registries, so a recipe picks each part by a short id.

Every pluggable kind (vision encoders, bridges, bridge wrappers, objectives, training kinds, and the checks of
the recipe's component settings) is one `Registry`, defined here at the bottom of the package and filled one
way: the modules it names register their entries with `@REGISTRY.register(name)`, and are imported the first
time a name is looked up. Defining a registry imports nothing, so the recipe schema (`config.py`) checks a
component's settings through its registry without importing the layers above it, and no package keeps an import
list for its side effects. A plugin outside mmbridge registers the same way, after importing the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of constructors with clear errors for unknown names; `modules` fill it when first read."""

    def __init__(self, kind: str, modules: tuple[str, ...] | list[str] = ()):
        self.kind = kind
        self.modules = tuple(modules)
        self._table: dict[str, Callable[..., T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if self._table.get(name, fn) is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a module being imported may look names up
            for module in self.modules:
                importlib.import_module(module)

    def get(self, name: str) -> Callable[..., T]:
        self._load()
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._table)}")
        return self._table[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _in(package: str, *modules: str) -> list[str]:
    return [f"mmbridge.{package}.{m}" for m in modules]


_BRIDGE_MODULES = (
    "gated_xattn",
    "llama_vid",
    "mlp",
    "objects",
    "pool_adapter",
    "qformer",
    "resampler",
    "visual_expert",
)
_OBJECTIVE_MODULES = ("blip2", "captioning", "concepts", "croc", "lcl", "lexical", "objects")

# `model.vision.name`
VISION_ENCODERS: Registry = Registry("vision encoder", _in("models", "vision", "vit"))
# `model.bridge.name`
BRIDGES: Registry = Registry("bridge", _in("models.bridges", *_BRIDGE_MODULES))
# a key of `model.bridge` that wraps the named bridge (`concepts: {...}`: its tokens read out as words)
BRIDGE_WRAPPERS: Registry = Registry("bridge wrapper", _in("models.bridges", "concepts"))
# a stage's `objective.name`
OBJECTIVES: Registry = Registry("objective", _in("objectives", *_OBJECTIVE_MODULES))
# a stage's `train.<part>` mode (frozen, full, lora, moe, mma): what it adds and which parameters learn
TRAIN_MODES: Registry = Registry("train mode", ["mmbridge.train.parts"])
# a recipe's `kind`: a factory recipe -> TrainSpec (train/spec.py)
TRAIN_SPECS: Registry = Registry("recipe kind", ["mmbridge.train.lmm_task", "mmbridge.lcl.task"])
# checks of the recipe's component settings, each `(value, where) -> None` raising RecipeError (config.validate)
SETTINGS: Registry = Registry(
    "recipe setting", _in("data", "documents", "video") + _in("lcl", "sequence") + _in("models", "moe", "mma")
)
