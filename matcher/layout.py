"""The files of a gallery folder, its manifest and its writer's lock.

    gallery.h5          the source of truth, with the segments: the oldest rows (see `store`)
    gallery-v<N>.h5     a segment: rows committed after gallery.h5, written by version N
    index-v<N>.faiss    a FAISS IndexFlatL2 of the first `index_faces` face rows (a cache of the rows)
    manifest.json       written last, by atomic rename: names the committed version, its files and counts
    .lock               held (an OS lock, through filelock) by the one writer; records its pid and command
    last-run.json       the summary of the last build or add

No file is modified once a manifest names it (gallery.h5 is only ever replaced whole, by rename), and
readers load what the manifest names, so a writer that dies before the rename leaves the previous
version readable, and the next writer finds it intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import filelock

from matcher.errors import GalleryError, GalleryLockedError

FORMAT = 2
# Format 1 is format 2 without segments (gallery.h5 was appended in place); the writer upgrades it.
READABLE_FORMATS = (1, 2)
H5_NAME = "gallery.h5"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
SUMMARY_NAME = "last-run.json"


@dataclass
class Manifest:
    """What readers load: the committed version of the gallery."""

    version: int = 0
    photos: int = 0  # committed photo rows in all row files (removed ones included)
    faces: int = 0  # committed face rows
    # the row files after gallery.h5, in row order: {"file", "photos", "faces", "removals"} each;
    # gallery.h5 holds the first photos - sum(photos) photo rows and faces - sum(faces) face rows
    segments: list[dict[str, Any]] = field(default_factory=list)
    index: str | None = None  # FAISS file holding face rows [0, index_faces)
    index_faces: int = 0
    index_sha256: str | None = None
    photo_root: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    written_at: float = 0.0
    command: str = ""
    format: int = FORMAT


def manifest_path(gallery: str | os.PathLike[str]) -> Path:
    return Path(gallery) / MANIFEST_NAME


def is_gallery(gallery: str | os.PathLike[str]) -> bool:
    return manifest_path(gallery).is_file()


def read_manifest(gallery: str | os.PathLike[str]) -> Manifest:
    """The committed manifest; GalleryError when the folder is missing or not a gallery."""
    folder = Path(gallery)
    if not folder.is_dir():
        raise GalleryError(f"no gallery at {folder}: build one with `fsw-index build PHOTOS --gallery {folder}`")
    path = manifest_path(folder)
    if not path.is_file():
        raise GalleryError(
            f"{folder} is not an fsw gallery (no {MANIFEST_NAME}): "
            f"build one with `fsw-index build PHOTOS --gallery {folder}`"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GalleryError(f"{path} is unreadable ({e}): run `fsw-index verify --gallery {folder}`") from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise GalleryError(f"{path} has format {got!r}; this fsw reads formats {', '.join(map(str, READABLE_FORMATS))}")
    known = set(Manifest.__dataclass_fields__)
    try:
        return Manifest(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise GalleryError(f"{path} is unreadable ({e}): run `fsw-index verify --gallery {folder}`") from None


def manifest_version(gallery: str | os.PathLike[str]) -> int | None:
    """The committed version, or None when there is no readable manifest (cheap: for polling)."""
    try:
        return int(json.loads(manifest_path(gallery).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(gallery: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write the manifest atomically: temp file, fsync, rename, fsync of the folder."""
    folder = Path(gallery)
    atomic_write(folder / MANIFEST_NAME, json.dumps(asdict(manifest), indent=2, sort_keys=True))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriterLock:
    """The single-writer lock: an OS lock on `.lock` (flock on POSIX, LockFileEx on Windows, by `filelock`),
    which the OS releases when the writer dies. The file names its holder for the refusal a second writer gets.

    Windows locks byte 0 of the file and keeps the locked bytes from other readers, so the holder's line is
    written after one padding byte, where another process can read it.
    """

    def __init__(self, gallery: str | os.PathLike[str], command: str):
        self.path = Path(gallery) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            locked = filelock.lock_descriptor(fd, blocking=False)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise GalleryLockedError(f"gallery at {self.path.parent} is locked by {self.holder()}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"\npid {os.getpid()} ({self.command})\n".encode())
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it: "pid 4121 (fsw-index add)"."""
        try:
            with open(self.path, "rb") as f:
                f.seek(1)  # past the byte that Windows keeps locked
                return f.read(200).decode(errors="replace").strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            filelock.unlock_descriptor(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
