"""Finding the photos to index and naming them.

A photo's id is its path relative to the photo root, with '/' separators; its stage is its folder.

Only what lies in the tree is indexed (issue 12; `matcher.files` says why): a photo file is indexed when it is
a regular file whose real path lies under the photo root; a link that leaves the tree, a FIFO, a device or a
socket named like a photo is skipped with the reason. A linked folder whose real path lies under the root is
followed once, after the folders themselves, unless its folder was scanned already (a loop, or a link to a
folder the scan covers): each folder is scanned at most once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from matcher.errors import FswError
from matcher.files import UnsafeFile, inside, kind
from matcher.images import is_photo


class ScanError(FswError):
    """A photo folder or path that cannot be indexed as asked."""


@dataclass
class Scan:
    """What a scan found: the photo files, sorted, and the photo-named paths it left out with the reason."""

    photos: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def photo_id(path: Path, root: Path) -> str:
    """The id of `path` under `root`; ScanError when it is not below the root."""
    try:
        # the folder is resolved, not the file: a symlinked photo keeps its own name
        rel = (path.absolute().parent.resolve() / path.name).relative_to(root.resolve())
    except ValueError:
        raise ScanError(f"{path} is not inside the gallery's photo root {root}") from None
    return rel.as_posix()


def find_photos(paths: Iterable[Path], root: Path | None = None) -> list[Path]:
    """Every photo file (jpg, jpeg, png, webp, any case) at or under the given paths, sorted (`scan_photos`;
    root None: each path is its own root)."""
    return scan_photos(paths, root).photos


def scan_photos(paths: Iterable[Path], root: Path | None = None) -> Scan:
    """The photo files at or under `paths` that lie in the photo tree `root`, and those left out, why."""
    scan = Scan()
    seen: set[str] = set()  # real paths of the folders scanned
    for path in paths:
        if not path.exists():
            raise ScanError(f"{path} does not exist")
        top = root if root is not None else (path if path.is_dir() else path.parent)
        where, real_top = (path if path.is_dir() else path.absolute().parent).resolve(), top.resolve()
        if where != real_top and real_top not in where.parents:
            raise ScanError(f"{path} is not inside the gallery's photo root {top}")
        if not path.is_dir():
            if not is_photo(path):
                raise ScanError(f"{path} is not a photo (jpg, jpeg, png or webp)")
            _add_file(scan, path, top)
            continue
        if not os.access(path, os.R_OK | os.X_OK):
            raise ScanError(f"cannot read folder {path}")
        links = _scan_folder(scan, path, top, seen)
        while links:  # linked folders: after the folders themselves, each real folder once
            link = links.pop(0)
            real = os.path.realpath(link)
            if real in seen:
                scan.skipped.append((link, f"a link to the folder {real}, scanned already: not followed again"))
            else:
                links += _scan_folder(scan, link, top, seen)
    scan.photos = sorted(set(scan.photos))
    return scan


def _scan_folder(scan: Scan, folder: Path, root: Path, seen: set[str]) -> list[Path]:
    """Scan `folder` and the folders below it (not through links); return the links to folders under the root."""
    links: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            scan.skipped.append((current, f"cannot read folder: {e.strerror or e}"))
            continue
        folders: list[Path] = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = inside(path, root)
                except UnsafeFile as e:
                    if is_photo(entry.name) or os.path.isdir(path):
                        scan.skipped.append((path, str(e)))
                    continue
                if target.is_dir():
                    links.append(path)
                elif is_photo(entry.name):
                    _add_file(scan, path, root)
            elif entry.is_dir(follow_symlinks=False):
                folders.append(path)
            elif is_photo(entry.name):
                _add_file(scan, path, root)
        stack.extend(reversed(folders))
    return links


def _add_file(scan: Scan, path: Path, root: Path) -> None:
    """A photo-named path: indexed when it is a regular file in the tree, else skipped with the reason."""
    try:
        target = inside(path, root)
        what = kind(target.stat().st_mode)
    except UnsafeFile as e:
        scan.skipped.append((path, str(e)))
        return
    except OSError:  # a dangling link, a file gone: the build reports it as it reads it ("cannot read file")
        scan.photos.append(path)
        return
    if what is not None:
        scan.skipped.append((path, f"{what}, not a photo file: not read"))
    else:
        scan.photos.append(path)
