"""The files of a gallery folder: their names, the manifest (validated field by field), the writer's lock,
atomic replacement, who may read the files, hashing.

What each file holds and why no committed file is ever modified: docs/gallery-format.md. The row files
are read by `matcher.rows` and written by `matcher.writer`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import filelock

from matcher import defaults
from matcher.errors import GalleryError, GalleryLockedError, ManifestError

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
    # the index rows' 8-bit codes (`matcher.coarse`): {"file", "sha256", "error"}; None where not written
    coarse: dict[str, Any] | None = None
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


def _coarse_entry(v: Any) -> bool:
    return (isinstance(v, dict) and is_file_name(v.get("file")) and _sha256(v.get("sha256"))
            and isinstance(v.get("error"), int | float) and not isinstance(v.get("error"), bool)
            and math.isfinite(v["error"]) and v["error"] >= 0)


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
    "coarse": (_null_or(_coarse_entry), "null or {file, sha256, error} of the index's codes"),
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
    if raw.get("coarse") and not raw.get("index"):
        bad["coarse"] = "null when there is no index file (the codes are of the index's rows)"
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


def coarse_file(m: Manifest) -> str | None:
    """The codes file the manifest names (`matcher.coarse`), if any."""
    return m.coarse["file"] if m.coarse else None


def manifest_version(gallery: str | os.PathLike[str]) -> int | None:
    """The committed version, or None when there is no readable manifest (cheap: for polling)."""
    try:
        return int(json.loads(manifest_path(gallery).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(gallery: str | os.PathLike[str], manifest: Manifest) -> None:
    """Publish a version: the manifest, replaced atomically. A gallery without forgotten faces writes no
    `forgotten` keys, as before they existed."""
    doc = {k: v for k, v in asdict(manifest).items() if not (k.startswith(("forgotten", "coarse")) and v is None)}
    atomic_write(manifest_path(gallery), json.dumps(doc, indent=2, sort_keys=True))


# -- atomic replacement and hashing ---------------------------------------------------------------------


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a temporary path beside it to write; then fsyncs that file,
    renames it over `path` and fsyncs the folder, so that a crash leaves either the old file or the new one.

    The temporary file is created first, empty, with the mode `file_mode` gives (writers that open it
    again keep that mode), so the data is never readable by others, not even while it is written. On an
    error it is removed; a process killed meanwhile leaves `.<name>.<pid>.tmp`, which the next gallery
    writer removes.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # one left by a killed process that had this pid
        mode = file_mode(path.parent)
        os.close(_open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
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


# -- who may read the files ------------------------------------------------------------------------------

# A gallery holds biometric descriptors: its files are its owner's alone (0600, the folder 0700), unless the
# operator shares the folder with a group by its setgid bit (`chgrp fsw gallery; chmod 2750 gallery`), for
# workers that run as another user of that group: then the files are 0640 (the folder keeps the
# operator's group bits). See docs/gallery-format.md, "Who may read it".
PRIVATE_FILE, GROUP_FILE, PRIVATE_FOLDER = 0o600, 0o640, 0o700


def shared_with_group(folder: Path) -> bool:
    """True when `folder` has the setgid bit: its files get its group, and the group may read them."""
    try:
        return bool(folder.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False


def file_mode(folder: Path) -> int:
    """The mode of a file fsw writes in `folder`: 0600, or 0640 in a folder shared with its group."""
    return GROUP_FILE if shared_with_group(folder) else PRIVATE_FILE


def make_private(folder: Path) -> None:
    """Give a new gallery folder its mode: 0700, or, shared with its group, the operator's mode less
    everything for others. (Not possible for a folder someone else owns: left as it is; its files are
    0600 or 0640 anyway.)"""
    mode = stat.S_IMODE(folder.stat().st_mode) & ~0o007 if shared_with_group(folder) else PRIVATE_FOLDER
    with contextlib.suppress(PermissionError):
        os.chmod(folder, mode)


def _open_private(path: Path, flags: int, mode: int) -> int:
    """os.open with `mode` exactly (not less what the umask takes), never through a symbolic link."""
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), mode)
    if hasattr(os, "fchmod"):  # POSIX; on Windows a file's mode is only its read-only flag
        try:
            os.fchmod(fd, mode)
        except PermissionError:  # a file someone else owns (a lock left by another user of the group)
            pass
        except BaseException:
            os.close(fd)
            raise
    return fd


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
        # The file is emptied below: never open it through a link, or the file it points to would be
        # emptied instead. O_NOFOLLOW refuses a symbolic link (the check before it is for Windows), the
        # link count a hard one.
        if self.path.is_symlink():
            raise self._not_a_lock_file("a symbolic link")
        try:
            fd = _open_private(self.path, os.O_RDWR | os.O_CREAT, file_mode(self.path.parent))
        except OSError as e:
            if e.errno == errno.ELOOP:  # made a symbolic link since the check
                raise self._not_a_lock_file("a symbolic link") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._not_a_lock_file("not a plain file")
            if st.st_nlink > 1:
                raise self._not_a_lock_file(f"a hard link (one of {st.st_nlink} names of a file)")
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

    def _not_a_lock_file(self, what: str) -> GalleryError:
        return GalleryError(f"{self.path} is {what}, not fsw's lock file: remove it (what it links to is left "
                            "alone) and run the command again")

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
