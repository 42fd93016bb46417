"""Output folders of `mmbridge export` and `mmbridge import`: filled under a temporary name made for that one call,
then published whole (fsync, `manifest.json` of sizes and sha256, one rename) without ever replacing anything.

`OUT` may be missing or an empty folder when the command starts (`check_new`). At publish time it must still be
so: a missing `OUT` is created empty first, which refuses anything that appeared meanwhile (an empty folder
too), and the rename onto it, which the kernel refuses unless the folder is empty, is the one step that puts the
output in place. Refused, nothing at `OUT` is touched and the finished output is kept where it was made.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mmbridge.interop import InteropError
from mmbridge.train.checkpoint import CheckpointError, seal, unique_beside


@dataclass(frozen=True)
class Staging:
    """The temporary folder `path` that one command fills for `out`; `out_was_folder`: `out` was an empty
    folder when the command started (else it did not exist)."""

    out: Path
    path: Path
    out_was_folder: bool


def check_new(out: Path) -> None:
    """Refuse an output path that already holds something (it is never replaced)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(
            f"{out}: already exists and is not an empty folder; choose a new output folder (nothing there was touched)"
        )


def staging(out: Path) -> Staging:
    """A new empty folder `.NAME.<random>.tmp` beside `out`, this call's own; `out` must not hold anything yet."""
    out = Path(out)
    check_new(out)
    try:
        return Staging(out, unique_beside(out, "tmp"), out.is_dir())
    except OSError as e:
        raise CheckpointError(f"could not create a folder beside {out}: {e.strerror or e}") from e


def publish(stage: Staging) -> None:
    """Fsync the filled folder, write its manifest and rename it to `stage.out`, refusing (InteropError) if
    something appeared there since the command started; then the filled folder is kept and named."""
    out, path = stage.out, stage.path
    seal(path)
    made = False
    try:
        if not stage.out_was_folder:
            os.mkdir(out)  # anything there now, an empty folder too, appeared meanwhile: FileExistsError
            made = True
        os.rename(path, out)  # onto an empty folder only: the kernel refuses one that is not empty
    except OSError as e:
        if made:
            try:
                os.rmdir(out)  # the empty folder made above (only while empty)
            except OSError:
                pass
        raise InteropError(
            f"{out}: something was put there while this command ran ({e.strerror or e}); "
            f"nothing there was touched, and the finished output was kept in {path} (move it "
            "where you want it)"
        ) from e
    try:
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"published {out}, but could not sync its parent folder: {e.strerror or e}") from e


def discard(stage: Staging) -> None:
    """Remove this call's temporary folder after a failure (never anything else)."""
    shutil.rmtree(stage.path, ignore_errors=True)
