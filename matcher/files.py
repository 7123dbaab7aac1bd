"""Reading a photo tree's files safely: regular files whose real path lies under the tree's root, and nothing else.

A photo tree is the operator's, but what lies in it is not always: a link to a file outside it would be
indexed (and its faces searched), a FIFO named `pipe.jpg` blocks its reader until a writer comes (it hung
`fsw-index build` with the gallery's lock held), and `/dev/zero` never ends (issue 12). So every photo is
opened here: its real path must lie under the root (links that stay inside the tree keep working, under
their own names), it is opened with `O_NOFOLLOW | O_NONBLOCK` (never blocks, never follows a link swapped in
since), and `fstat` of the open file must say a regular file. `fsw-index build`'s scan, hashing and decoding
and the fleet worker's local photo source all use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from matcher.errors import ImageError


class UnsafeFile(ImageError):
    """A photo path fsw will not read: outside the photo tree, or not a regular file. The message says which."""


def kind(mode: int) -> str | None:
    """What a file that is not a regular file is, for a reason a person reads; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """The real path of `path` (every link followed), which must lie under the real path of `root`."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != top and top not in real.parents:
        raise UnsafeFile(f"a link to {real}, outside the photo tree {top}: not read")
    return real


def open_photo(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> BinaryIO:
    """`path` opened for reading, if it is a regular file whose real path lies under `root` (None: anywhere,
    for a path already checked). Raises UnsafeFile, or ImageError when it cannot be read."""
    real = inside(path, root) if root is not None else Path(os.path.realpath(path))
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    try:
        what = kind(os.fstat(fd).st_mode)
        if what is not None:
            raise UnsafeFile(f"{what}, not a photo file: not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
