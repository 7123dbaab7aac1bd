"""Finding the photos to index and naming them.

A photo's id is its path relative to the photo root, with '/' separators; its stage is its folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from matcher.errors import FswError
from matcher.images import is_photo


class ScanError(FswError):
    """A photo folder or path that cannot be indexed as asked."""


def photo_id(path: Path, root: Path) -> str:
    """The id of `path` under `root`; ScanError when it is not below the root."""
    try:
        # the folder is resolved, not the file: a symlinked photo keeps its own name
        rel = (path.absolute().parent.resolve() / path.name).relative_to(root.resolve())
    except ValueError:
        raise ScanError(f"{path} is not inside the gallery's photo root {root}") from None
    return rel.as_posix()


def find_photos(paths: Iterable[Path]) -> list[Path]:
    """Every photo file (jpg, jpeg, png, webp, any case) at or under the given paths, sorted."""
    out: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ScanError(f"{path} does not exist")
        if path.is_file():
            if not is_photo(path):
                raise ScanError(f"{path} is not a photo (jpg, jpeg, png or webp)")
            out.append(path)
            continue
        if not os.access(path, os.R_OK | os.X_OK):
            raise ScanError(f"cannot read folder {path}")
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            out.extend(Path(folder) / f for f in sorted(files) if is_photo(f))
    return sorted(set(out))
