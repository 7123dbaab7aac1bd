"""The row files of a committed gallery version, as readers need them: columns, reading, which rows are live.

`read_rows` and `iter_descriptors` read what a manifest names (`matcher.gallery` and `matcher.verify` use
them); `live` is the one visibility rule. The files and columns are described in docs/gallery-format.md;
`matcher.writer` writes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from matcher import defaults, layout
from matcher.errors import GalleryError

STR = h5py.string_dtype("utf-8")
PHOTO_COLUMNS: dict[str, Any] = {
    "id": STR, "stage": STR, "sha256": "S64", "size": "i8", "mtime": "f8", "faces": "i4", "removed_at": "i8",
}
FACE_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "photo": ("i8", ()), "box": ("i4", (4,)), "descriptor": ("f4", (128,)),
}


def live(removed_at: np.ndarray, version: int) -> np.ndarray:
    """Which photo rows version `version` shows: never removed (0), or removed by a later version than it."""
    return (removed_at == 0) | (removed_at > version)


@dataclass
class Rows:
    """Photo and face rows (column -> array) and removals of earlier photo rows ((row, version) pairs)."""

    photos: dict[str, np.ndarray]
    faces: dict[str, np.ndarray]
    removals: np.ndarray  # int64 (n, 2)

    @property
    def weight(self) -> int:
        return count(self.photos) + count(self.faces) + len(self.removals)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(
            {k: np.concatenate([p.photos[k] for p in parts]) for k in parts[0].photos},
            {k: np.concatenate([p.faces[k] for p in parts]) for k in parts[0].faces},
            np.concatenate([p.removals for p in parts]).reshape(-1, 2),
        )


def count(columns: dict[str, np.ndarray]) -> int:
    """Rows in a group of columns."""
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


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """An HDF5 file without HDF5's own file locking: the writer's lock and the manifest order access."""
    return h5py.File(path, mode, locking=False)


def read_file(
    folder: Path, f: DataFile, photo_columns: tuple[str, ...], face_columns: tuple[str, ...], face_from: int = 0
) -> Rows:
    """The committed rows of one file (face rows from global row `face_from` on), removals not applied."""
    with open_h5(folder / f.name) as h5:
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
        # in blocks: h5py holds the GIL while it reads text, and the 2.5M ids of a 10M-face gallery read at
        # once stalled every other thread (a worker's jobs and event loop, while it loads a new version)
        # for 0.2 s; a block of 65,536 ids, for a few milliseconds
        out = np.empty(max(hi - lo, 0), dtype=object)
        for a in range(lo, hi, defaults.DESCRIPTOR_READ_ROWS):
            b = min(a + defaults.DESCRIPTOR_READ_ROWS, hi)
            out[a - lo : b - lo] = ds.asstr()[a:b]
        return out
    return ds[lo:hi]


def read_rows(
    folder: str | os.PathLike[str],
    m: layout.Manifest,
    photo_columns: tuple[str, ...] = tuple(PHOTO_COLUMNS),
    face_columns: tuple[str, ...] = ("photo", "box"),
    face_from: int = 0,
) -> Rows:
    """The committed rows of version `m` from all its files, removals applied to `removed_at` when read.

    Face rows start at global row `face_from`; photo rows are all read. Which photos `m` shows:
    `live(rows.photos["removed_at"], m.version)`.
    """
    folder = Path(folder)
    rows = Rows.concat([read_file(folder, f, photo_columns, face_columns, face_from) for f in data_files(m)])
    if "removed_at" in rows.photos:
        apply_removals(rows.photos["removed_at"], rows.removals, 0)
    return rows


def iter_descriptors(folder: str | os.PathLike[str], m: layout.Manifest, start: int = 0) -> Iterator[np.ndarray]:
    """Committed descriptors from global face row `start` on, in blocks (float32, C-contiguous)."""
    folder = Path(folder)
    step = defaults.DESCRIPTOR_READ_ROWS
    for f in data_files(m):
        lo = max(start - f.face_start, 0)
        if lo >= f.faces:
            continue
        with open_h5(folder / f.name) as h5:
            ds = h5["faces/descriptor"]
            if ds.shape[0] < f.faces:
                raise GalleryError(f"{folder / f.name} holds {ds.shape[0]} face rows, the manifest names {f.faces}")
            for a in range(lo, f.faces, step):
                yield np.ascontiguousarray(ds[a : min(a + step, f.faces)], dtype=np.float32)


def apply_removals(removed_at: np.ndarray, removals: np.ndarray, first_row: int) -> np.ndarray:
    """Mark rows at or after `first_row` removed (first removal wins); returns the removals before it."""
    inside = removals[:, 0] >= first_row
    for row, version in removals[inside]:
        if removed_at[row - first_row] == 0:
            removed_at[row - first_row] = version
    return removals[~inside]
