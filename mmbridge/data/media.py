"""A record's media names as files: the one place where an `image`, a video or frame, or an MMC4 `image_name`
becomes a path (`media_path`), and the one reader of a media file's bytes (`read_media`, for shard writers).

A name is relative to its source's image root (a recipe's `images`; none given: the working directory). It
is refused with a `MediaPathError`, which names it and the root, when

* it looks like a URL (`http://h/x.mp4`, `file:…`, `concat:…`): media are files, and FFmpeg never sees a URL;
* it is absolute or climbs out (`/etc/passwd`, `../x.png`) to a place outside the root (an absolute name
  inside the root is accepted).

What is checked is the name a record gives; the root's own contents are the user's layout, so a symlink in it
(`images/coco -> /mnt/datasets/coco`, the common way to place a dataset) is followed wherever it points.

A name that exists but is not a regular file (a folder, a device such as /dev/zero, a FIFO, a socket) is an
unreadable image (`ImageError`); this is found with `stat`, so nothing is opened and nothing blocks. A name
that names nothing passes: reading it says that the file does not exist, as for any missing image. The path
given back is absolute, so no URL parser reads a scheme into it.
"""

from __future__ import annotations

import os
import re
import stat

from mmbridge.data.images import ImageError

OUTSIDE = "outside the image root"  # the count's name under `bad_samples: skip`
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # what FFmpeg and urllib would read as a protocol


class MediaPathError(ImageError):
    """A record's media name that does not name a file inside its root; `kind` names the skip count."""

    kind = OUTSIDE


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _what(mode: int) -> str:
    return (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a file"
    )


def media_path(root: str | os.PathLike | None, name: str) -> str:
    """The absolute path of media `name` under `root` (see the module's rules), or MediaPathError."""
    base = os.path.abspath(os.fspath(root) if root else ".")
    if "\0" in name:
        raise MediaPathError(name, "the name holds a NUL character")
    if _SCHEME.match(name):
        raise MediaPathError(name, f"a URL is not a file: give a path relative to the image root {base}")
    joined = os.path.normpath(os.path.join(base, name))
    if not _within(joined, base):
        raise MediaPathError(
            name, f"{joined} is outside the image root {base} (media are files under their source's image root)"
        )
    try:
        mode = os.stat(joined).st_mode  # through the root's symlinks
    except OSError:  # missing or unreadable: the reader says which
        return joined
    if not stat.S_ISREG(mode):
        raise ImageError(joined, f"not a regular file ({_what(mode)})")
    return joined


def read_media(root: str | os.PathLike | None, name: str) -> bytes:
    """The bytes of media `name` under `root`: `media_path`'s checks, then the file is opened without
    blocking and checked again on its descriptor (a file swapped for a FIFO or device meanwhile is refused)."""
    path = media_path(root, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageError(path, "file does not exist") from None
    except OSError as e:
        raise ImageError(path, f"cannot open it ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(path, f"not a regular file ({_what(mode)})")
        return f.read()
