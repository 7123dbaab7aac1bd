"""Writing a gallery: create, append photos and faces, remove, commit. One writer at a time.

gallery.h5 layout (chunked, resizable datasets; rows are only ever appended):
    /photos/id          utf-8 str   path relative to the photo root, '/' separators
    /photos/stage       utf-8 str   the photo's folder ('' at the root)
    /photos/sha256      S64         content hash, for dedupe
    /photos/size        int64       bytes
    /photos/mtime       float64     modification time when indexed (resume skips unchanged files)
    /photos/faces       int32       faces found
    /photos/removed_at  int64       version that removed it; 0 = live
    /faces/photo        int64       row in /photos
    /faces/box          int32 (4)   top, right, bottom, left in the photo's pixels
    /faces/descriptor   float32 (128)
    attrs: format, settings (JSON), photo_root

A commit appends the buffered rows, flushes and closes the file, writes a new FAISS index file when
enough rows came since the last one, and then renames a new manifest into place. Rows past the
manifest's counts (from a writer that died) are cut away by the next writer before it appends.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np

from matcher import layout
from matcher.encoder import Face
from matcher.errors import GalleryError, SettingsMismatchError

_STR = h5py.string_dtype("utf-8")
_CHUNK = 4096
# A new FAISS file is written when the rows after the last one exceed this share of all faces;
# below it readers add those rows from gallery.h5, so a small `add` costs no rewrite of the index.
INDEX_REWRITE_SHARE = 0.25


@dataclass
class PendingPhoto:
    id: str
    sha256: str
    size: int
    mtime: float = 0.0
    faces: list[Face] = field(default_factory=list)


@dataclass
class Known:
    """What the writer knows of the committed photos, for dedupe and resume."""

    by_id: dict[str, tuple[int, str]]  # live photo id -> (row, sha256)
    by_hash: dict[str, str]  # sha256 -> live photo id
    stamps: dict[str, tuple[int, float]]  # live photo id -> (size, mtime) when indexed

    def unchanged(self, photo_id: str, size: int, mtime: float) -> bool:
        return self.stamps.get(photo_id) == (size, mtime)


class GalleryWriter:
    """The single writer of a gallery folder. Use as a context manager; call `commit()` to publish."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        settings: dict[str, Any],
        photo_root: str | os.PathLike[str] | None = None,
        command: str = "fsw-index",
        create: bool = False,
    ):
        self.folder = Path(folder)
        self.command = command
        self._lock = layout.WriterLock(self.folder, command) if self.folder.is_dir() else None
        if create and not layout.is_gallery(self.folder):
            self._create(settings, photo_root)
        if self._lock is None:
            layout.read_manifest(self.folder)  # raises the clear "no gallery" error
        assert self._lock is not None
        self._lock.acquire()
        try:
            self.manifest = layout.read_manifest(self.folder)
            self._check_settings(settings)
            self._roll_back_uncommitted()
            self.known = self._read_known()
        except BaseException:
            self._lock.release()
            raise
        self._pending: list[PendingPhoto] = []
        self._removals: list[int] = []

    @property
    def photo_root(self) -> Path:
        return Path(self.manifest.photo_root)

    def _create(self, settings: dict[str, Any], photo_root: str | os.PathLike[str] | None) -> None:
        if self.folder.exists() and any(p.name != layout.LOCK_NAME for p in self.folder.iterdir()):
            raise GalleryError(f"{self.folder} is not empty and not an fsw gallery: choose another --gallery")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = layout.WriterLock(self.folder, self.command)
        with self._lock:
            if layout.is_gallery(self.folder):
                return  # another builder created it first
            root = str(Path(photo_root).resolve()) if photo_root else ""
            tmp = self.folder / f".{layout.H5_NAME}.tmp"
            with h5py.File(tmp, "w") as h5:
                h5.attrs["format"] = layout.FORMAT
                h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
                h5.attrs["photo_root"] = root
                p, f = h5.create_group("photos"), h5.create_group("faces")
                for name, dtype in (("id", _STR), ("stage", _STR), ("sha256", "S64")):
                    p.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(_CHUNK,))
                for name, dtype in (("size", "i8"), ("mtime", "f8"), ("faces", "i4"), ("removed_at", "i8")):
                    p.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(_CHUNK,))
                f.create_dataset("photo", (0,), dtype="i8", maxshape=(None,), chunks=(_CHUNK,))
                f.create_dataset("box", (0, 4), dtype="i4", maxshape=(None, 4), chunks=(_CHUNK, 4))
                f.create_dataset("descriptor", (0, 128), dtype="f4", maxshape=(None, 128), chunks=(1024, 128))
            os.replace(tmp, self.folder / layout.H5_NAME)
            manifest = layout.Manifest(photo_root=root, settings=settings, written_at=time.time(), command=self.command)
            layout.write_manifest(self.folder, manifest)

    def _check_settings(self, settings: dict[str, Any]) -> None:
        have = self.manifest.settings
        diff = {k: (have.get(k), v) for k, v in settings.items() if have.get(k) != v}
        if diff:
            said = ", ".join(f"{k}: gallery {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SettingsMismatchError(
                f"encoder settings differ from the gallery's ({said}); descriptors made differently cannot be "
                "mixed: use the gallery's settings or build a new gallery"
            )

    def _roll_back_uncommitted(self) -> None:
        """Cut rows and removals that a writer which died wrote past the committed manifest."""
        m = self.manifest
        with self._h5("r+") as h5:
            photos, faces = h5["photos"], h5["faces"]
            if photos["id"].shape[0] < m.photos or faces["photo"].shape[0] < m.faces:
                raise GalleryError(f"{self.folder / layout.H5_NAME} holds fewer rows than its manifest names")
            for ds in photos.values():
                if ds.shape[0] != m.photos:
                    ds.resize(m.photos, axis=0)
            for ds in faces.values():
                if ds.shape[0] != m.faces:
                    ds.resize(m.faces, axis=0)
            removed = photos["removed_at"][:]
            late = removed > m.version
            if late.any():
                removed[late] = 0
                photos["removed_at"][:] = removed

    def _read_known(self) -> Known:
        with self._h5("r") as h5:
            ids = h5["photos/id"].asstr()[:]
            hashes = h5["photos/sha256"][:]
            sizes = h5["photos/size"][:]
            mtimes = h5["photos/mtime"][:]
            live = np.flatnonzero(h5["photos/removed_at"][:] == 0)
        by_id = {str(ids[r]): (int(r), hashes[r].decode()) for r in live}
        stamps = {str(ids[r]): (int(sizes[r]), float(mtimes[r])) for r in live}
        return Known(by_id, {sha: pid for pid, (_, sha) in by_id.items()}, stamps)

    def _h5(self, mode: str) -> h5py.File:
        return h5py.File(self.folder / layout.H5_NAME, mode, locking=False)

    # -- changes -------------------------------------------------------------------------------

    def add(self, photo: PendingPhoto) -> None:
        """Buffer a photo and its faces; a photo already indexed under its id is replaced."""
        old = self.known.by_id.get(photo.id)
        if old is not None:
            self._removals.append(old[0])
            self.known.by_hash.pop(old[1], None)
        self._pending.append(photo)
        self.known.by_id[photo.id] = (-1, photo.sha256)
        self.known.by_hash[photo.sha256] = photo.id
        self.known.stamps[photo.id] = (photo.size, photo.mtime)

    def remove(self, targets: list[str]) -> list[str]:
        """Take out photos by id, or whole stages (every photo under a folder). Returns removed ids."""
        out: list[str] = []
        for target in targets:
            t = target.strip().strip("/")
            hits = [t] if t in self.known.by_id else [i for i in self.known.by_id if i.startswith(t + "/")]
            for pid in hits:
                row, sha = self.known.by_id.pop(pid)
                self.known.by_hash.pop(sha, None)
                self.known.stamps.pop(pid, None)
                if row >= 0:
                    self._removals.append(row)
                else:
                    self._pending = [p for p in self._pending if p.id != pid]
                out.append(pid)
        return out

    @property
    def dirty(self) -> bool:
        return bool(self._pending or self._removals)

    def commit(self, final: bool = True) -> layout.Manifest:
        """Publish the buffered changes as a new version. `final` allows rewriting the FAISS index."""
        if not self.dirty:
            return self.manifest
        m = self.manifest
        version = m.version + 1
        new_faces = [f for p in self._pending for f in p.faces]
        with self._h5("r+") as h5:
            photos, faces = h5["photos"], h5["faces"]
            n_photos, n_faces = m.photos + len(self._pending), m.faces + len(new_faces)
            if self._pending:
                rows = {
                    "id": [p.id for p in self._pending],
                    "stage": [p.id.rpartition("/")[0] for p in self._pending],
                    "sha256": [p.sha256.encode() for p in self._pending],
                    "size": [p.size for p in self._pending],
                    "mtime": [p.mtime for p in self._pending],
                    "faces": [len(p.faces) for p in self._pending],
                    "removed_at": [0] * len(self._pending),
                }
                for name, values in rows.items():
                    photos[name].resize(n_photos, axis=0)
                    photos[name][m.photos :] = values
            if new_faces:
                owner = np.repeat(np.arange(m.photos, n_photos), [len(p.faces) for p in self._pending])
                faces["photo"].resize(n_faces, axis=0)
                faces["photo"][m.faces :] = owner
                faces["box"].resize(n_faces, axis=0)
                faces["box"][m.faces :] = np.asarray([f.box for f in new_faces], dtype=np.int32)
                faces["descriptor"].resize(n_faces, axis=0)
                faces["descriptor"][m.faces :] = np.stack([f.descriptor for f in new_faces]).astype(np.float32)
            for row in sorted(set(self._removals)):
                photos["removed_at"][row] = version
            h5.flush()
        _fsync_file(self.folder / layout.H5_NAME)
        index, index_faces, index_sha = m.index, m.index_faces, m.index_sha256
        tail = n_faces - index_faces
        if final and tail and (index is None or tail > INDEX_REWRITE_SHARE * n_faces):
            index, index_sha = self._write_index(version, n_faces)
            index_faces = n_faces
        new = layout.Manifest(
            version=version,
            photos=n_photos,
            faces=n_faces,
            index=index,
            index_faces=index_faces,
            index_sha256=index_sha,
            photo_root=m.photo_root,
            settings=m.settings,
            written_at=time.time(),
            command=self.command,
        )
        layout.write_manifest(self.folder, new)
        self.manifest = new
        for offset, p in enumerate(self._pending):
            self.known.by_id[p.id] = (m.photos + offset, p.sha256)
        self._pending, self._removals = [], []
        self._drop_old_indexes(keep=index)
        return new

    def _write_index(self, version: int, n_faces: int) -> tuple[str, str]:
        index = faiss.IndexFlatL2(128)
        with self._h5("r") as h5:
            ds = h5["faces/descriptor"]
            for lo in range(0, n_faces, 1 << 16):
                index.add(np.ascontiguousarray(ds[lo : min(lo + (1 << 16), n_faces)], dtype=np.float32))
        name = f"index-v{version}.faiss"
        tmp = self.folder / f".{name}.tmp"
        faiss.write_index(index, str(tmp))
        _fsync_file(tmp)
        os.replace(tmp, self.folder / name)
        return name, _sha256(self.folder / name)

    def _drop_old_indexes(self, keep: str | None) -> None:
        for p in self.folder.glob("index-v*.faiss"):
            if p.name != keep:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    from matcher.models import file_sha256

    return file_sha256(str(path))
