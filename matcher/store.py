"""Writing a gallery: create, add photos and faces, remove, commit. One writer at a time.

A gallery's rows live in HDF5 files that nothing modifies once a manifest names them:
    gallery.h5          the base: the oldest rows
    gallery-v<N>.h5     a segment: rows committed after the base, written by version N
Photo and face rows are numbered across the files in the manifest's order, base first. Each file holds
    /photos/id          utf-8 str   path relative to the photo root, '/' separators
    /photos/stage       utf-8 str   the photo's folder ('' at the root)
    /photos/sha256      S64         content hash, for dedupe
    /photos/size        int64       bytes
    /photos/mtime       float64     modification time when indexed (resume skips unchanged files)
    /photos/faces       int32       faces found
    /photos/removed_at  int64       version that removed it; 0 = live (as known when the file was written)
    /faces/photo        int64       photo row (numbered across files)
    /faces/box          int32 (4)   top, right, bottom, left in the photo's pixels
    /faces/descriptor   float32 (128)
    /removals/row       int64       photo rows of earlier files removed by this file's versions,
    /removals/version   int64       and by which version
    attrs: format, settings (JSON), photo_root

A commit writes one new file (temp file, fsync, rename), perhaps a FAISS index, then renames the manifest
into place, then deletes the files that no manifest names any more. Usually the new file holds only the
new rows, so a commit costs what was added. When the new rows weigh at least half as much as the file
before them, that file (and the smaller ones after it) is merged with them into one: the "logarithmic
method", which keeps about log2(rows) files, each row rewritten about log2(rows) times over the life of a
gallery. A merge that reaches the base writes a new gallery.h5 and renames it over the old one; rows
keep their numbers, so a reader of the previous manifest reads the same rows from it, and a removal it
does not know yet has a version above its own, which readers ignore.

Why not append to one HDF5 file in place: HDF5 is not crash-safe. SIGKILLed while an append was being
flushed, gallery.h5 was left so that no later writer could extend it, and once so that the committed
descriptors could not be read at all (found by tests/reliability/test_commit_kill.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import h5py
import numpy as np

from matcher import layout
from matcher.errors import GalleryError, SettingsMismatchError

if TYPE_CHECKING:  # readers (Gallery, verify) need not load dlib
    from matcher.encoder import Face

_STR = h5py.string_dtype("utf-8")
PHOTO_COLUMNS: dict[str, Any] = {
    "id": _STR, "stage": _STR, "sha256": "S64", "size": "i8", "mtime": "f8", "faces": "i4", "removed_at": "i8",
}
FACE_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "photo": ("i8", ()), "box": ("i4", (4,)), "descriptor": ("f4", (128,)),
}
_CHUNK = {"descriptor": 1024}  # rows per HDF5 chunk; 4096 for the other columns
# A file is merged with the newer rows after it when they weigh at least 1/MERGE_RATIO of it.
MERGE_RATIO = 2
# A new FAISS file is written when the rows after the last one exceed this share of all faces;
# below it readers add those rows from the row files, so a small `add` costs no rewrite of the index.
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

    by_id: dict[str, tuple[int, str]]  # live photo id -> (row, sha256); row -1 while pending
    by_hash: dict[str, str]  # sha256 -> live photo id
    stamps: dict[str, tuple[int, float]]  # live photo id -> (size, mtime) when indexed

    def unchanged(self, photo_id: str, size: int, mtime: float) -> bool:
        return self.stamps.get(photo_id) == (size, mtime)


# -- rows and the files that hold them ------------------------------------------------------------


@dataclass
class Rows:
    """Photo and face rows (column -> array) and removals of earlier photo rows ((row, version) pairs)."""

    photos: dict[str, np.ndarray]
    faces: dict[str, np.ndarray]
    removals: np.ndarray  # int64 (n, 2)

    @property
    def weight(self) -> int:
        return _n(self.photos) + _n(self.faces) + len(self.removals)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(
            {k: np.concatenate([p.photos[k] for p in parts]) for k in parts[0].photos},
            {k: np.concatenate([p.faces[k] for p in parts]) for k in parts[0].faces},
            np.concatenate([p.removals for p in parts]).reshape(-1, 2),
        )


def _n(columns: dict[str, np.ndarray]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


@dataclass(frozen=True)
class DataFile:
    """One row file of a committed version and the global rows it holds."""

    name: str
    photo_start: int
    photos: int
    face_start: int
    faces: int
    removals: int

    @property
    def weight(self) -> int:
        return self.photos + self.faces + self.removals


def data_files(m: layout.Manifest) -> list[DataFile]:
    """The row files a manifest names, base first, with the rows each holds."""
    segments = m.segments or []
    photo_start = m.photos - sum(int(s["photos"]) for s in segments)
    face_start = m.faces - sum(int(s["faces"]) for s in segments)
    if photo_start < 0 or face_start < 0:
        raise GalleryError(f"the manifest's segments hold more rows than the manifest names (version {m.version})")
    out = [DataFile(layout.H5_NAME, 0, photo_start, 0, face_start, 0)]
    for s in segments:
        n_p, n_f = int(s["photos"]), int(s["faces"])
        out.append(DataFile(str(s["file"]), photo_start, n_p, face_start, n_f, int(s.get("removals", 0))))
        photo_start, face_start = photo_start + n_p, face_start + n_f
    return out


def _h5(path: Path, mode: str = "r") -> h5py.File:
    return h5py.File(path, mode, locking=False)


def _read_file(
    folder: Path, f: DataFile, photo_columns: tuple[str, ...], face_columns: tuple[str, ...], face_from: int = 0
) -> Rows:
    """The committed rows of one file (face rows from global row `face_from` on)."""
    with _h5(folder / f.name) as h5:
        for group, need in (("photos", f.photos), ("faces", f.faces)):
            have = h5[group]["id" if group == "photos" else "photo"].shape[0]
            if have < need:
                raise GalleryError(f"{folder / f.name} holds {have} {group[:-1]} rows, the manifest names {need}")
        photos = {c: _column(h5["photos"][c], 0, f.photos) for c in photo_columns}
        lo = min(max(face_from - f.face_start, 0), f.faces)
        faces = {c: _column(h5["faces"][c], lo, f.faces) for c in face_columns}
        if f.removals:
            removals = np.stack([h5["removals/row"][: f.removals], h5["removals/version"][: f.removals]], axis=1)
        else:
            removals = np.zeros((0, 2), np.int64)
    return Rows(photos, faces, removals.astype(np.int64))


def _column(ds: h5py.Dataset, lo: int, hi: int) -> np.ndarray:
    info = h5py.check_string_dtype(ds.dtype)
    if info is not None and info.length is None:  # variable-length utf-8 (ids, stages); sha256 stays bytes
        return np.asarray(ds.asstr()[lo:hi], dtype=object)
    return ds[lo:hi]


def read_rows(
    folder: str | os.PathLike[str],
    m: layout.Manifest,
    photo_columns: tuple[str, ...] = tuple(PHOTO_COLUMNS),
    face_columns: tuple[str, ...] = ("photo", "box"),
    face_from: int = 0,
) -> Rows:
    """The committed rows of version `m` from all its files, removals applied to `removed_at` when read.

    Face rows start at global row `face_from`; photo rows are all read. A photo is live when its
    `removed_at` is 0 or above `m.version` (a removal this version does not include).
    """
    folder = Path(folder)
    parts = [_read_file(folder, f, photo_columns, face_columns, face_from) for f in data_files(m)]
    rows = Rows.concat(parts)
    if "removed_at" in rows.photos:
        _apply_removals(rows.photos["removed_at"], rows.removals, 0)
    return rows


def iter_descriptors(folder: str | os.PathLike[str], m: layout.Manifest, start: int = 0) -> Iterator[np.ndarray]:
    """Committed descriptors from global face row `start` on, in blocks (float32, C-contiguous)."""
    folder = Path(folder)
    step = 1 << 16
    for f in data_files(m):
        lo = max(start - f.face_start, 0)
        if lo >= f.faces:
            continue
        with _h5(folder / f.name) as h5:
            ds = h5["faces/descriptor"]
            if ds.shape[0] < f.faces:
                raise GalleryError(f"{folder / f.name} holds {ds.shape[0]} face rows, the manifest names {f.faces}")
            for a in range(lo, f.faces, step):
                yield np.ascontiguousarray(ds[a : min(a + step, f.faces)], dtype=np.float32)


def _apply_removals(removed_at: np.ndarray, removals: np.ndarray, first_row: int) -> np.ndarray:
    """Mark rows at or after `first_row` removed (first removal wins); returns the removals before it."""
    inside = removals[:, 0] >= first_row
    for row, version in removals[inside]:
        if removed_at[row - first_row] == 0:
            removed_at[row - first_row] = version
    return removals[~inside]


def _write_file(folder: Path, name: str, rows: Rows, attrs: dict[str, Any]) -> None:
    """Write a row file under a temporary name, fsync it, rename it into place."""
    tmp = folder / f".{name}.tmp"
    with _h5(tmp, "w") as h5:
        for k, v in attrs.items():
            h5.attrs[k] = v
        for c, dtype in PHOTO_COLUMNS.items():
            _dataset(h5, f"photos/{c}", rows.photos[c], dtype, ())
        for c, (dtype, tail) in FACE_COLUMNS.items():
            _dataset(h5, f"faces/{c}", rows.faces[c], dtype, tail)
        _dataset(h5, "removals/row", rows.removals[:, 0], "i8", ())
        _dataset(h5, "removals/version", rows.removals[:, 1], "i8", ())
    layout.fsync_path(tmp)
    os.replace(tmp, folder / name)
    layout.fsync_path(folder)


def _dataset(h5: h5py.File, path: str, data: np.ndarray, dtype: Any, tail: tuple[int, ...]) -> None:
    n = len(data)
    chunk = max(1, min(n, _CHUNK.get(path.rpartition("/")[2], 4096)))
    values = list(data) if dtype is _STR else np.asarray(data, dtype=dtype).reshape((n, *tail))
    h5.create_dataset(path, shape=(n, *tail), dtype=dtype, maxshape=(None, *tail), chunks=(chunk, *tail))
    if n:
        h5[path][:] = values


def _empty_rows() -> Rows:
    photos = {c: np.zeros(0, object if d is _STR else d) for c, d in PHOTO_COLUMNS.items()}
    faces = {c: np.zeros((0, *tail), d) for c, (d, tail) in FACE_COLUMNS.items()}
    return Rows(photos, faces, np.zeros((0, 2), np.int64))


# -- the writer ------------------------------------------------------------------------------------


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
            self._clean_up()
            self.known = self._read_known()
        except BaseException:
            self._lock.release()
            raise
        self._pending: list[PendingPhoto] = []
        self._removals: list[int] = []

    @property
    def photo_root(self) -> Path:
        return Path(self.manifest.photo_root)

    def _attrs(self) -> dict[str, Any]:
        m = self.manifest
        return {"format": layout.FORMAT, "settings": json.dumps(m.settings, sort_keys=True), "photo_root": m.photo_root}

    def _create(self, settings: dict[str, Any], photo_root: str | os.PathLike[str] | None) -> None:
        if self.folder.exists() and not _only_creation_leftovers(self.folder):
            raise GalleryError(f"{self.folder} is not empty and not an fsw gallery: choose another --gallery")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = layout.WriterLock(self.folder, self.command)
        with self._lock:
            if layout.is_gallery(self.folder):
                return  # another builder created it first
            if not _only_creation_leftovers(self.folder):
                raise GalleryError(f"{self.folder} is not empty and not an fsw gallery: choose another --gallery")
            root = str(Path(photo_root).resolve()) if photo_root else ""
            self.manifest = layout.Manifest(photo_root=root, settings=settings, written_at=time.time(),
                                            command=self.command)
            _write_file(self.folder, layout.H5_NAME, _empty_rows(), self._attrs())
            layout.write_manifest(self.folder, self.manifest)

    def _check_settings(self, settings: dict[str, Any]) -> None:
        have = self.manifest.settings
        diff = {k: (have.get(k), v) for k, v in settings.items() if have.get(k) != v}
        if diff:
            said = ", ".join(f"{k}: gallery {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SettingsMismatchError(
                f"encoder settings differ from the gallery's ({said}); descriptors made differently cannot be "
                "mixed: use the gallery's settings or build a new gallery"
            )

    def _clean_up(self) -> None:
        """Remove what a writer that died left behind; make gallery.h5 hold exactly its committed rows.

        gallery.h5 holds more only when a writer died between renaming a merged base into place and
        writing its manifest (or it was appended in place by an older fsw); it is rewritten, not cut in
        place, so that a kill now cannot harm it either.
        """
        m = self.manifest
        named = {f.name for f in data_files(m)} | {m.index}
        for p in self.folder.iterdir():
            if _is_leftover(p.name, named):
                p.unlink(missing_ok=True)
        base = data_files(m)[0]
        with _h5(self.folder / layout.H5_NAME) as h5:
            longer = any(ds.shape[0] > base.photos for ds in h5["photos"].values())
            longer |= any(ds.shape[0] > base.faces for ds in h5["faces"].values())
            longer |= "removals" not in h5
            late = bool((h5["photos/removed_at"][: base.photos] > m.version).any())
        if longer or late:
            rows = _read_file(self.folder, base, tuple(PHOTO_COLUMNS), tuple(FACE_COLUMNS))
            removed_at = rows.photos["removed_at"]
            removed_at[removed_at > m.version] = 0
            _write_file(self.folder, layout.H5_NAME, rows, self._attrs())

    def _read_known(self) -> Known:
        m = self.manifest
        rows = read_rows(self.folder, m, ("id", "sha256", "size", "mtime", "removed_at"), ())
        p = rows.photos
        live = np.flatnonzero((p["removed_at"] == 0) | (p["removed_at"] > m.version))
        by_id = {str(p["id"][r]): (int(r), p["sha256"][r].decode()) for r in live}
        stamps = {str(p["id"][r]): (int(p["size"][r]), float(p["mtime"][r])) for r in live}
        return Known(by_id, {sha: pid for pid, (_, sha) in by_id.items()}, stamps)

    # -- changes -------------------------------------------------------------------------------

    def add(self, photo: PendingPhoto) -> None:
        """Buffer a photo and its faces; a photo already indexed under its id is replaced."""
        old = self.known.by_id.get(photo.id)
        if old is not None:
            if old[0] >= 0:
                self._removals.append(old[0])
            else:
                self._pending = [p for p in self._pending if p.id != photo.id]
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
        """Publish the buffered changes as a new version. `final` allows rewriting the FAISS index.

        A final commit with nothing buffered still writes the index when it is due (after a run that
        committed everything at checkpoints), under the same version: the rows do not change.
        """
        m = self.manifest
        if not self.dirty and not (final and _index_due(m)):
            return m
        new = replace(m, written_at=time.time(), command=self.command, format=layout.FORMAT)
        if self.dirty:
            new = self._write_rows(replace(new, version=m.version + 1))
        if final and _index_due(new):
            name, sha = self._write_index(new)
            new = replace(new, index=name, index_faces=new.faces, index_sha256=sha)
        layout.write_manifest(self.folder, new)
        self.manifest = new
        for offset, p in enumerate(self._pending):
            self.known.by_id[p.id] = (m.photos + offset, p.sha256)
        self._pending, self._removals = [], []
        named = {f.name for f in data_files(new)} | {new.index}
        for p in self.folder.iterdir():
            if _is_old(p.name, named):
                p.unlink(missing_ok=True)
        return new

    def _pending_rows(self, version: int) -> Rows:
        m, pending = self.manifest, self._pending
        faces = [f for p in pending for f in p.faces]
        photos = {
            "id": np.asarray([p.id for p in pending], dtype=object),
            "stage": np.asarray([p.id.rpartition("/")[0] for p in pending], dtype=object),
            "sha256": np.asarray([p.sha256.encode() for p in pending], dtype="S64"),
            "size": np.asarray([p.size for p in pending], dtype=np.int64),
            "mtime": np.asarray([p.mtime for p in pending], dtype=np.float64),
            "faces": np.asarray([len(p.faces) for p in pending], dtype=np.int32),
            "removed_at": np.zeros(len(pending), np.int64),
        }
        owner = np.repeat(np.arange(m.photos, m.photos + len(pending)), [len(p.faces) for p in pending])
        face_cols = {
            "photo": owner.astype(np.int64),
            "box": np.asarray([f.box for f in faces], dtype=np.int32).reshape(-1, 4),
            "descriptor": np.asarray([f.descriptor for f in faces], dtype=np.float32).reshape(-1, 128),
        }
        rows = sorted(set(self._removals))
        removals = np.asarray([(r, version) for r in rows], dtype=np.int64).reshape(-1, 2)
        return Rows(photos, face_cols, removals)

    def _write_rows(self, new: layout.Manifest) -> layout.Manifest:
        """Write the buffered rows as one new file, merged with the smaller files before them."""
        rows = self._pending_rows(new.version)
        files = data_files(self.manifest)
        j, weight = len(files), rows.weight
        while j > 0 and files[j - 1].weight <= MERGE_RATIO * weight:
            j -= 1
            weight += files[j].weight
        if j < len(files):
            old = [_read_file(self.folder, f, tuple(PHOTO_COLUMNS), tuple(FACE_COLUMNS)) for f in files[j:]]
            rows = Rows.concat([*old, rows])
            rows.removals = _apply_removals(rows.photos["removed_at"], rows.removals, files[j].photo_start)
        name = layout.H5_NAME if j == 0 else f"gallery-v{new.version}.h5"
        _write_file(self.folder, name, rows, self._attrs())
        kept = [] if j == 0 else list(self.manifest.segments[: j - 1])
        if j > 0:
            kept.append({"file": name, "photos": _n(rows.photos), "faces": _n(rows.faces),
                         "removals": len(rows.removals)})
        n_photos = self.manifest.photos + len(self._pending)
        n_faces = self.manifest.faces + sum(len(p.faces) for p in self._pending)
        return replace(new, photos=n_photos, faces=n_faces, segments=kept)

    def _write_index(self, m: layout.Manifest) -> tuple[str, str]:
        index = faiss.IndexFlatL2(128)
        for block in iter_descriptors(self.folder, m):
            index.add(block)
        name = f"index-v{m.version}.faiss"
        tmp = self.folder / f".{name}.tmp"
        faiss.write_index(index, str(tmp))
        layout.fsync_path(tmp)
        os.replace(tmp, self.folder / name)
        layout.fsync_path(self.folder)
        return name, _sha256(self.folder / name)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_due(m: layout.Manifest) -> bool:
    tail = m.faces - m.index_faces
    return tail > 0 and (m.index is None or tail > INDEX_REWRITE_SHARE * m.faces)


def _is_old(name: str, named: set[str | None]) -> bool:
    """A row or index file that the current manifest no longer names."""
    return name not in named and (
        (name.startswith("gallery-v") and name.endswith(".h5"))
        or (name.startswith("index-v") and name.endswith(".faiss"))
    )


def _is_leftover(name: str, named: set[str | None]) -> bool:
    """Something a writer that died left: a temporary file, or a file no manifest named yet."""
    temporary = name.endswith(".tmp") and name.startswith(
        (".gallery", ".index-v", f".{layout.MANIFEST_NAME}.", f".{layout.SUMMARY_NAME}.")
    )
    return temporary or _is_old(name, named)


def _only_creation_leftovers(folder: Path) -> bool:
    """True when the folder holds nothing, or only what a build killed while creating it leaves."""
    for p in folder.iterdir():
        if p.name == layout.LOCK_NAME or _is_leftover(p.name, set()):
            continue
        if p.name == layout.H5_NAME and _is_empty_base(p):
            continue  # renamed into place just before the kill, before the first manifest
        return False
    return True


def _is_empty_base(path: Path) -> bool:
    try:
        with _h5(path) as h5:
            return h5.attrs.get("format") is not None and h5["photos/id"].shape[0] == 0
    except (OSError, KeyError):
        return False



def _sha256(path: Path) -> str:
    from matcher.models import file_sha256

    return file_sha256(str(path))
