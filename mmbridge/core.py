"""The bottom of mmbridge: what every layer may use and nothing of mmbridge's own is imported by (errors, the
device-spec check)."""

from __future__ import annotations

import re


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
