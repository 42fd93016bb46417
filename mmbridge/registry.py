"""Name → constructor registries, so a recipe picks each part by a short id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of constructors with clear errors for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._table)}")
        return self._table[name]

    def names(self) -> list[str]:
        return sorted(self._table)
