"""The recipe's `log` section: which trackers a run sends its metrics to, checked when the recipe loads (the
trackers themselves are in `train/tracking.py`)."""

from __future__ import annotations

import importlib.util
import sys

from mmbridge.core import RecipeError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_KEYS = ("project", "entity", "name", "mode", "dir", "tags", "group", "notes")


class TrackingError(RecipeError):
    """A `log` section that cannot be used (unknown key, or a tracker whose package is not installed)."""


def _missing(name: str) -> TrackingError:
    return TrackingError(
        f"recipe.log.{name}: the `{PACKAGES[name]}` package is not installed; install it with "
        f"`pip install {PACKAGES[name]}` (or `pip install 'mmbridge[track]'`)"
    )


def check(log: dict) -> None:
    """Raise TrackingError for unknown keys or an asked-for tracker whose package is missing."""
    if not isinstance(log, dict):
        raise TrackingError(f"recipe.log: expected a mapping such as {{tensorboard: true}}, got {log!r}")
    unknown = set(log) - set(PACKAGES)
    if unknown:
        raise TrackingError(f"recipe.log: unknown key(s) {sorted(unknown)}; expected some of {sorted(PACKAGES)}")
    if not isinstance(log.get("tensorboard", False), bool):
        raise TrackingError(f"recipe.log.tensorboard: expected true or false, got {log['tensorboard']!r}")
    wandb = log.get("wandb")
    if wandb not in (None, False, True) and not isinstance(wandb, dict):
        raise TrackingError(f"recipe.log.wandb: expected true or a mapping of {list(WANDB_KEYS)}, got {wandb!r}")
    if isinstance(wandb, dict) and set(wandb) - set(WANDB_KEYS):
        raise TrackingError(
            f"recipe.log.wandb: unknown key(s) {sorted(set(wandb) - set(WANDB_KEYS))}; expected "
            f"some of {list(WANDB_KEYS)}"
        )
    for name in PACKAGES:
        if log.get(name) and not _installed(PACKAGES[name]):
            raise _missing(name)


def _installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (a None in sys.modules blocks an import)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None
