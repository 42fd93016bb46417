"""Output folders of `mmbridge export` and `mmbridge import`: filled under a temporary name, then published
whole with the run directory's atomic writer (fsync, `manifest.json` of sizes and sha256, rename)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mmbridge.interop import InteropError
from mmbridge.train.checkpoint import CheckpointError, write_folder


def check_new(out: Path) -> None:
    """Refuse an output path that already holds something (it is never replaced)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out}: already exists and is not an empty folder; choose a new output folder "
                           "(nothing there was touched)")


def staging(out: Path) -> Path:
    """The empty temporary folder `.NAME.tmp` beside `out`, to fill; `out` must not hold anything yet."""
    out = Path(out)
    check_new(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"could not create {tmp}: {e.strerror or e}") from e
    return tmp


def publish(out: Path) -> None:
    """Fsync the filled temporary folder, write its manifest and rename it to `out` (see `staging`)."""
    write_folder(Path(out), {}, prefilled=True)


def discard(out: Path) -> None:
    """Remove the temporary folder of `out` after a failure."""
    shutil.rmtree(Path(out).with_name(f".{Path(out).name}.tmp"), ignore_errors=True)
