"""Writing a gallery: create it, add photos and their faces, remove photos, commit a version. One writer at a time.

`GalleryWriter` buffers changes and `commit()` publishes them as a new version: one new row file (merged
with the smaller files before it, the "logarithmic method"), perhaps a new FAISS index, then the manifest;
then it deletes the files no manifest names. Opening a writer takes the gallery's lock and clears what a
writer that died left. The files, and why no committed file is modified: docs/gallery-format.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import h5py
import numpy as np

from matcher import coarse, defaults, forgotten, layout, rows
from matcher.errors import GalleryError, SettingsMismatchError
from matcher.rows import FACE_COLUMNS, PHOTO_COLUMNS, Rows

if TYPE_CHECKING:  # the writer does not load dlib
    from matcher.encoder import Face


def _face_arrays(faces: Iterable[Face]) -> tuple[np.ndarray, np.ndarray]:
    """Faces as the arrays a pending photo carries: boxes int32 (n, 4), descriptors float32 (n, 128)."""
    faces = list(faces)
    boxes = np.asarray([f.box for f in faces], dtype=np.int32).reshape(-1, 4)
    descriptors = np.asarray([f.descriptor for f in faces], dtype=np.float32).reshape(-1, 128)
    return boxes, descriptors


@dataclass
class PendingPhoto:
    """A photo to add, and the faces found in it as arrays: they go to the row file as they are."""

    id: str
    sha256: str
    size: int
    mtime: float = 0.0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))  # top, right, bottom, left
    descriptors: np.ndarray = field(default_factory=lambda: np.zeros((0, 128), np.float32))

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.int32).reshape(-1, 4)
        self.descriptors = np.asarray(self.descriptors, dtype=np.float32).reshape(-1, 128)
        if len(self.boxes) != len(self.descriptors):
            raise ValueError(f"{self.id}: {len(self.boxes)} boxes but {len(self.descriptors)} descriptors")

    @classmethod
    def from_faces(cls, id: str, sha256: str, size: int, mtime: float, faces: Iterable[Face]) -> PendingPhoto:
        """A pending photo from `Face` objects (as `Encoder.faces` returns them)."""
        return cls(id, sha256, size, mtime, *_face_arrays(faces))

    @property
    def face_count(self) -> int:
        return len(self.boxes)


@dataclass
class Known:
    """What the writer knows of the committed photos, for dedupe and resume."""

    by_id: dict[str, tuple[int, str]]  # live photo id -> (row, sha256); row -1 while pending
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
            self._clean_up()
            self.known = self._read_known()
        except BaseException:
            self._lock.release()
            raise
        self._pending: list[PendingPhoto] = []
        self._removals: list[int] = []
        self._forgotten: list[forgotten.Forgotten] | None = None  # read on first use; changed: not None
        self.failed: Exception | None = None  # the error of a commit that failed: no write is tried after it

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
        layout.make_private(self.folder)
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
        named = _named_files(m)
        for p in self.folder.iterdir():
            if _is_leftover(p.name, named):
                _unlink(p)
        base = rows.data_files(m)[0]
        with rows.open_h5(self.folder / layout.H5_NAME) as h5:
            longer = any(ds.shape[0] > base.photos for ds in h5["photos"].values())
            longer |= any(ds.shape[0] > base.faces for ds in h5["faces"].values())
            longer |= "removals" not in h5
            late = bool((h5["photos/removed_at"][: base.photos] > m.version).any())
        if longer or late:
            committed = rows.read_file(self.folder, base, tuple(PHOTO_COLUMNS), tuple(FACE_COLUMNS))
            removed_at = committed.photos["removed_at"]
            removed_at[removed_at > m.version] = 0
            _write_file(self.folder, layout.H5_NAME, committed, self._attrs())

    def _read_known(self) -> Known:
        m = self.manifest
        p = rows.read_rows(self.folder, m, ("id", "sha256", "size", "mtime", "removed_at"), ()).photos
        live = np.flatnonzero(rows.live(p["removed_at"], m.version))
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
    def forgotten(self) -> list[forgotten.Forgotten]:
        """The forgotten faces, with the changes buffered (`matcher.forgotten`)."""
        if self._forgotten is None:
            return forgotten.read(self.folder, self.manifest)
        return list(self._forgotten)

    def forget(self, entries: list[forgotten.Forgotten]) -> None:
        """Buffer forgotten faces to add; ones whose id the gallery holds already are left as they are."""
        have = self.forgotten
        known = {e.id for e in have}
        new = [e for e in entries if e.id not in known]
        if new:
            self._forgotten = have + new

    def unforget(self, ids: list[str]) -> list[str]:
        """Buffer the removal of forgotten faces by id (their descriptors leave the gallery at the commit).
        Returns the ids found."""
        have = self.forgotten
        found = [e.id for e in have if e.id in ids]
        if found:
            self._forgotten = [e for e in have if e.id not in ids]
        return found

    @property
    def dirty(self) -> bool:
        return bool(self._pending or self._removals or self._forgotten is not None)

    def commit(self, final: bool = True) -> layout.Manifest:
        """Publish the buffered changes as a new version. `final` allows rewriting the FAISS index.

        A final commit with nothing buffered still writes the index when it is due (after a run that
        committed everything at checkpoints), under the same version: the rows do not change.
        """
        m = self.manifest
        if not self.dirty and not (final and _index_due(m)):
            return m
        if self.failed is not None:
            raise GalleryError(f"a write to the gallery at {self.folder} failed earlier ({_reason(self.failed)}): "
                               "this writer writes no more; run the command again")
        try:
            new = self._write(m, final)
        except Exception as e:
            # A full disk, an I/O error: the previous version stands. Remove what this commit wrote (its
            # temporary files are gone already), and write nothing more: a second try would fail alike,
            # and its error would hide this one, the one to report.
            self.failed = e
            published = _manifest_or(self.folder, m)
            with contextlib.suppress(OSError):
                self._delete_unnamed(m, published)
            if not isinstance(e, OSError | RuntimeError):  # FAISS reports a failed write as RuntimeError
                raise
            raise GalleryError(
                f"could not write version {m.version + self.dirty} of the gallery at {self.folder}: {_reason(e)}; "
                f"version {published.version} is intact: free space (or mend the error) and run the command again"
            ) from e
        self.manifest = new
        for offset, p in enumerate(self._pending):
            self.known.by_id[p.id] = (m.photos + offset, p.sha256)
        self._pending, self._removals, self._forgotten = [], [], None
        self._delete_unnamed(new)
        return new

    def switch(self, new: layout.Manifest) -> layout.Manifest:
        """Publish `new`, a whole next version whose files are in the folder already (`indexer.rebuild` links a
        staged gallery's files in), with one manifest rename; then delete the files no manifest names."""
        if self.dirty:
            raise GalleryError(f"the writer of {self.folder} holds uncommitted changes: commit them before a switch")
        if new.version <= self.manifest.version:
            raise GalleryError(f"version {new.version} does not follow version {self.manifest.version}")
        layout.write_manifest(self.folder, new)
        self.manifest = new
        self.known = self._read_known()
        self._delete_unnamed(new)
        return new

    def _write(self, m: layout.Manifest, final: bool) -> layout.Manifest:
        """Write the files of the next version and its manifest; returns the manifest."""
        new = replace(m, written_at=time.time(), command=self.command, format=layout.FORMAT)
        if self.dirty:
            new = replace(new, version=m.version + 1)
            if self._pending or self._removals:
                new = self._write_rows(new)
            if self._forgotten is not None:
                new = self._write_forgotten(new, self._forgotten)
        if new.forgotten:
            new = replace(new, format=layout.FORGOTTEN_FORMAT)
        if final and _index_due(new):
            name, sha, codes = self._write_index(new)
            new = replace(new, index=name, index_faces=new.faces, index_sha256=sha, coarse=codes)
        layout.write_manifest(self.folder, new)
        return new

    def _delete_unnamed(self, *manifests: layout.Manifest) -> None:
        """Delete the row, index and forgotten files none of `manifests` names."""
        named = set().union(*(_named_files(m) for m in manifests))
        for p in self.folder.iterdir():
            if _is_old(p.name, named):
                _unlink(p)

    def _pending_rows(self, version: int) -> Rows:
        m, pending = self.manifest, self._pending
        photos = {
            "id": np.asarray([p.id for p in pending], dtype=object),
            "stage": np.asarray([p.id.rpartition("/")[0] for p in pending], dtype=object),
            "sha256": np.asarray([p.sha256.encode() for p in pending], dtype="S64"),
            "size": np.asarray([p.size for p in pending], dtype=np.int64),
            "mtime": np.asarray([p.mtime for p in pending], dtype=np.float64),
            "faces": np.asarray([p.face_count for p in pending], dtype=np.int32),
            "removed_at": np.zeros(len(pending), np.int64),
        }
        owner = np.repeat(np.arange(m.photos, m.photos + len(pending)), [p.face_count for p in pending])
        faces = {
            "photo": owner.astype(np.int64),
            "box": np.concatenate([np.zeros((0, 4), np.int32), *(p.boxes for p in pending)]),
            "descriptor": np.concatenate([np.zeros((0, 128), np.float32), *(p.descriptors for p in pending)]),
        }
        removed = sorted(set(self._removals))
        removals = np.asarray([(r, version) for r in removed], dtype=np.int64).reshape(-1, 2)
        return Rows(photos, faces, removals)

    def _write_rows(self, new: layout.Manifest) -> layout.Manifest:
        """Write the buffered rows as one new file, merged with the smaller files before them."""
        batch = self._pending_rows(new.version)
        files = rows.data_files(self.manifest)
        j, weight = len(files), batch.weight
        while j > 0 and files[j - 1].weight <= defaults.MERGE_RATIO * weight:
            j -= 1
            weight += files[j].weight
        if j < len(files):
            old = [rows.read_file(self.folder, f, tuple(PHOTO_COLUMNS), tuple(FACE_COLUMNS)) for f in files[j:]]
            batch = Rows.concat([*old, batch])
            batch.removals = rows.apply_removals(batch.photos["removed_at"], batch.removals, files[j].photo_start)
        name = layout.H5_NAME if j == 0 else f"gallery-v{new.version}.h5"
        _write_file(self.folder, name, batch, self._attrs())
        kept = [] if j == 0 else list(self.manifest.segments[: j - 1])
        if j > 0:
            kept.append({"file": name, "photos": rows.count(batch.photos), "faces": rows.count(batch.faces),
                         "removals": len(batch.removals)})
        n_photos = self.manifest.photos + len(self._pending)
        n_faces = self.manifest.faces + sum(p.face_count for p in self._pending)
        return replace(new, photos=n_photos, faces=n_faces, segments=kept)

    def _write_forgotten(self, new: layout.Manifest, entries: list[forgotten.Forgotten]) -> layout.Manifest:
        """Write the forgotten faces as this version's file (none: no file); new entries get this version."""
        if not entries:
            return replace(new, forgotten=None, forgotten_sha256=None)
        entries = [e if e.version else replace(e, version=new.version) for e in entries]
        name, sha = forgotten.write(self.folder, new.version, entries)
        return replace(new, forgotten=name, forgotten_sha256=sha)

    def _write_index(self, m: layout.Manifest) -> tuple[str, str, dict[str, Any] | None]:
        """The index file of every face row, and its rows' 8-bit codes (`matcher.coarse`): names and hashes."""
        index = faiss.IndexFlatL2(128)
        for block in rows.iter_descriptors(self.folder, m):
            index.add(block)
        name = f"index-v{m.version}.faiss"
        with layout.atomic_replace(self.folder / name) as tmp:
            faiss.write_index(index, str(tmp))
        vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * 128).reshape(-1, 128) if index.ntotal else None
        codes = coarse.write(self.folder, m.version, vectors) if vectors is not None else None
        return name, layout.file_sha256(self.folder / name), codes

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    """An error as one line: an OSError's text and file, FAISS's first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _manifest_or(folder: Path, m: layout.Manifest) -> layout.Manifest:
    """The manifest on disk (a failure after the rename that publishes it leaves it published), else `m`."""
    try:
        return layout.read_manifest(folder)
    except GalleryError:
        return m


def _unlink(path: Path) -> None:
    """Delete a file no manifest names. Readers memory-map the index file (`matcher.gallery`), and Windows
    refuses to delete a mapped file: one a worker still maps is left for the next writer to remove."""
    with contextlib.suppress(PermissionError):
        path.unlink(missing_ok=True)


def _write_file(folder: Path, name: str, data: Rows, attrs: dict[str, Any]) -> None:
    """Write a row file whole, atomically (`layout.atomic_replace`)."""
    with layout.atomic_replace(folder / name) as tmp, rows.open_h5(tmp, "w") as h5:
        for k, v in attrs.items():
            h5.attrs[k] = v
        for c, dtype in PHOTO_COLUMNS.items():
            _dataset(h5, f"photos/{c}", data.photos[c], dtype, ())
        for c, (dtype, tail) in FACE_COLUMNS.items():
            _dataset(h5, f"faces/{c}", data.faces[c], dtype, tail)
        _dataset(h5, "removals/row", data.removals[:, 0], "i8", ())
        _dataset(h5, "removals/version", data.removals[:, 1], "i8", ())


def _dataset(h5: h5py.File, path: str, data: np.ndarray, dtype: Any, tail: tuple[int, ...]) -> None:
    n = len(data)
    most = defaults.H5_DESCRIPTOR_CHUNK_ROWS if path == "faces/descriptor" else defaults.H5_CHUNK_ROWS
    chunk = max(1, min(n, most))
    values = list(data) if dtype is rows.STR else np.asarray(data, dtype=dtype).reshape((n, *tail))
    h5.create_dataset(path, shape=(n, *tail), dtype=dtype, maxshape=(None, *tail), chunks=(chunk, *tail))
    if n:
        h5[path][:] = values


def _empty_rows() -> Rows:
    photos = {c: np.zeros(0, object if d is rows.STR else d) for c, d in PHOTO_COLUMNS.items()}
    faces = {c: np.zeros((0, *tail), d) for c, (d, tail) in FACE_COLUMNS.items()}
    return Rows(photos, faces, np.zeros((0, 2), np.int64))


def _index_due(m: layout.Manifest) -> bool:
    tail = m.faces - m.index_faces
    return tail > 0 and (m.index is None or tail > defaults.INDEX_REWRITE_SHARE * m.faces)


def _named_files(m: layout.Manifest) -> set[str | None]:
    """The files a version needs: its row files, index file, codes file and forgotten faces' file."""
    return {f.name for f in rows.data_files(m)} | {m.index, layout.coarse_file(m), m.forgotten}


def _is_old(name: str, named: set[str | None]) -> bool:
    """A row, index or forgotten file that the current manifest no longer names."""
    return name not in named and (
        (name.startswith("gallery-v") and name.endswith(".h5"))
        or (name.startswith("index-v") and name.endswith(".faiss"))
        or (name.startswith("forgotten-v") and name.endswith(".json"))
    )


def _is_leftover(name: str, named: set[str | None]) -> bool:
    """Something a writer that died left: a temporary file, or a file no manifest named yet."""
    temporary = name.endswith(".tmp") and name.startswith(
        (".gallery", ".index-v", ".forgotten-v", f".{layout.MANIFEST_NAME}.", f".{layout.SUMMARY_NAME}.")
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
        with rows.open_h5(path) as h5:
            return h5.attrs.get("format") is not None and h5["photos/id"].shape[0] == 0
    except (OSError, KeyError):
        return False
