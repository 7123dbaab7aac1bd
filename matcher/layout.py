"""The files of a gallery folder: their names, the manifest (validated field by field), the writer's lock,
atomic replacement, hashing.

What each file holds and why no committed file is ever modified: docs/gallery-format.md. The row files
are read by `matcher.rows` and written by `matcher.writer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import filelock

from matcher import defaults
from matcher.errors import GalleryLockedError, ManifestError

FORMAT = 2
# Format 1 is format 2 without segments (gallery.h5 was appended in place); the writer upgrades it.
# Format 3 is format 2 with forgotten faces (`forgotten`), written only when there are some, so that an
# fsw from before forgetting refuses the gallery instead of showing the faces it hides.
FORGOTTEN_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
H5_NAME = "gallery.h5"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
SUMMARY_NAME = "last-run.json"

# The encoder settings a gallery records, and a writer requires to match (`EncoderSettings.recorded()`): the
# descriptor model's sha256, the landmarks that align faces, and the EncoderSettings fields that shape
# descriptors. Other settings (engine, threads, the selfie's) may differ between processes.
ENCODER_FIELDS = ("detector", "upsample", "jitters", "max_side")
SETTINGS_KEYS = ("model", "landmarks", *ENCODER_FIELDS)


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
    forgotten: str | None = None  # the forgotten faces' file (`matcher.forgotten`), when there are any
    forgotten_sha256: str | None = None
    photo_root: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    written_at: float = 0.0
    command: str = ""
    format: int = FORMAT


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_file_name(v: Any) -> bool:
    """A name of a file directly in the gallery folder, as the writer names them: no path (absolute, `..`,
    a separator, a drive), so that no manifest can make a reader open a file outside the folder."""
    return isinstance(v, str) and v not in ("", ".", "..") and not any(c in v for c in "/\\:\x00")


def _sha256(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _null_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# Each field a manifest may hold: its check, and what it must be (said in the refusal). Missing fields take
# the Manifest's defaults; unknown ones are ignored.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (_count, "a non-negative integer"),
    "photos": (_count, "a non-negative integer"),
    "faces": (_count, "a non-negative integer"),
    "index_faces": (_count, "a non-negative integer"),
    "segments": (lambda v: isinstance(v, list), "a list of row files"),
    "index": (_null_or(is_file_name), "null or a file name in the gallery folder"),
    "index_sha256": (_null_or(_sha256), "null or 64 hex digits"),
    "forgotten": (_null_or(is_file_name), "null or a file name in the gallery folder"),
    "forgotten_sha256": (_null_or(_sha256), "null or 64 hex digits"),
    "photo_root": (lambda v: isinstance(v, str), "a string"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "written_at": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "command": (lambda v: isinstance(v, str), "a string"),
}
_SEGMENT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "file": (is_file_name, "a file name in the gallery folder"),
    "photos": (_count, "a non-negative integer"),
    "faces": (_count, "a non-negative integer"),
    "removals": (_count, "a non-negative integer"),  # may be absent: 0
}


def _malformed(raw: dict[str, Any]) -> dict[str, str]:
    """The manifest's malformed fields, each with what it must be; {} for a sound one."""
    bad = {k: what for k, (ok, what) in _FIELDS.items() if k in raw and not ok(raw[k])}
    if "segments" in bad:
        return bad
    segments = raw.get("segments", [])
    for i, s in enumerate(segments):
        if not isinstance(s, dict):
            bad[f"segments[{i}]"] = "an object with file, photos, faces and removals"
            continue
        for k, (ok, what) in _SEGMENT.items():
            if (k in s or k != "removals") and not ok(s.get(k)):
                bad[f"segments[{i}].{k}"] = what
    if bad:
        return bad
    for k in ("photos", "faces"):
        if sum(s[k] for s in segments) > raw.get(k, 0):
            bad["segments"] = f"files holding at most the manifest's {k} ({raw.get(k, 0)})"
    if raw.get("index_faces", 0) > raw.get("faces", 0):
        bad["index_faces"] = f"at most faces ({raw.get('faces', 0)})"
    return bad


def manifest_path(gallery: str | os.PathLike[str]) -> Path:
    return Path(gallery) / MANIFEST_NAME


def is_gallery(gallery: str | os.PathLike[str]) -> bool:
    return manifest_path(gallery).is_file()


def read_manifest(gallery: str | os.PathLike[str]) -> Manifest:
    """The committed manifest; ManifestError (a GalleryError) when the folder is missing or not a gallery,
    or its manifest is unreadable, of an unknown format or malformed: a field of the wrong type, a file
    name that is not one in the folder, counts that disagree (`_FIELDS`, `_SEGMENT`), each named. `fsw-index
    verify` reports the error's `problem`; everyone else its message, which adds the fix."""
    folder = Path(gallery)
    build = f"build one with `fsw-index build PHOTOS --gallery {folder}`"
    verify = f"run `fsw-index verify --gallery {folder}`"
    if not folder.is_dir():
        problem = f"no gallery at {folder}: the folder does not exist"
        raise ManifestError(problem, f"{problem}; {build}")
    path = manifest_path(folder)
    if not path.is_file():
        raise ManifestError(f"{MANIFEST_NAME} is missing: {folder} is not a gallery, or its manifest was deleted",
                            f"{folder} is not an fsw gallery (no {MANIFEST_NAME}): {build}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problem = f"{MANIFEST_NAME} is not readable JSON ({e})"
        raise ManifestError(problem, f"{path} is unreadable ({e}): {verify}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{MANIFEST_NAME} is not a JSON object", f"{path} is not a JSON object: {verify}")
    if raw.get("format") not in READABLE_FORMATS:
        problem = (f"{MANIFEST_NAME} has format {raw.get('format')!r}; "
                   f"this fsw reads formats {', '.join(map(str, READABLE_FORMATS))}")
        raise ManifestError(problem, f"{folder}/{problem}")
    bad = _malformed(raw)
    if bad:
        said = "; ".join(f"{k} must be {what}" for k, what in sorted(bad.items()))
        problem = f"{MANIFEST_NAME}: malformed {', '.join(sorted(bad))} ({said})"
        raise ManifestError(problem, f"{folder}/{problem}: {verify}")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in raw.items() if k in known})


def manifest_version(gallery: str | os.PathLike[str]) -> int | None:
    """The committed version, or None when there is no readable manifest (cheap: for polling)."""
    try:
        return int(json.loads(manifest_path(gallery).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(gallery: str | os.PathLike[str], manifest: Manifest) -> None:
    """Publish a version: the manifest, replaced atomically. A gallery without forgotten faces writes no
    `forgotten` keys, as before they existed."""
    doc = {k: v for k, v in asdict(manifest).items() if not (k.startswith("forgotten") and v is None)}
    atomic_write(manifest_path(gallery), json.dumps(doc, indent=2, sort_keys=True))


# -- atomic replacement and hashing ---------------------------------------------------------------------


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a temporary path beside it to write; then fsyncs that file,
    renames it over `path` and fsyncs the folder, so that a crash leaves either the old file or the new one.

    On an error the temporary file is removed; a process killed meanwhile leaves `.<name>.<pid>.tmp`, which
    the next gallery writer removes.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace the file at `path` with `data` (text is written as utf-8), atomically: see `atomic_replace`."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's content: a photo's identity for dedupe, an index file's checksum."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(defaults.HASH_BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


# -- the writer's lock ----------------------------------------------------------------------------------


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
