"""The bottom of mmbridge: what every layer may use, importing nothing of mmbridge's own (errors, the device-spec
check, the image placeholder, the label that is not a target, the cache folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGE_TOKEN = "<image>"  # where an image's tokens go in a conversation's text
IGNORE = -100  # a label that is not a target (PyTorch's cross-entropy ignore_index)


def cache_root() -> Path:
    """Where mmbridge keeps what it derives once (dequantised GGUF models, data indexes): $MMBRIDGE_CACHE or
    ~/.cache/mmbridge."""
    return Path(os.environ.get("MMBRIDGE_CACHE", Path.home() / ".cache" / "mmbridge"))


class RecipeError(ValueError):
    """A recipe that cannot be used as written."""


class DeviceError(RecipeError):
    """A device that was asked for and is not there (or a spec that is not a device)."""


_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_spec(spec: str, where: str = "device") -> str:
    """`spec` normalised, or a DeviceError if it is not auto, cpu, cuda or cuda:N."""
    norm = str(spec).strip().lower()
    if not _SPEC.match(norm):
        raise DeviceError(f"{where}: {spec!r} is not a device; expected auto, cpu, cuda or cuda:N")
    return norm
