"""A gallery opened for searching: the committed version, held in memory.

`Gallery.open(folder)` loads what the manifest names: photo and face metadata from the row files (only
the committed rows, see `matcher.rows`) and the descriptors into a FAISS IndexFlatL2 (from the index file
when there is one, plus any committed rows added after it). Any number of readers may open a gallery while
its one writer (`matcher.writer.GalleryWriter`) works; a reader never sees a half-written version. The
files: docs/gallery-format.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from matcher import defaults, layout, rows
from matcher.errors import GalleryError, StageError
from matcher.search import (
    DEFAULT_THRESHOLD,
    Match,
    best_per_photo,
    check_threshold,
    range_search,
)


@dataclass(frozen=True)
class GalleryStats:
    version: int
    photos: int
    faces: int
    photos_without_faces: int
    stages: dict[str, int]  # photos per stage (a photo's folder)


class Gallery:
    """The searchable, read-only view of one committed gallery version."""

    def __init__(
        self,
        folder: Path,
        manifest: layout.Manifest,
        photo_ids: np.ndarray,
        photo_live: np.ndarray,
        face_photo: np.ndarray,
        face_boxes: np.ndarray,
        index: faiss.IndexFlatL2,
    ):
        self.folder = folder
        self.manifest = manifest
        self.photo_ids = photo_ids
        self.photo_live = photo_live
        self.face_photo = face_photo
        self.face_boxes = face_boxes
        self.index = index
        self.vectors = _index_vectors(index)
        self.face_live = photo_live[face_photo] if len(face_photo) else np.zeros(0, bool)
        self.folders = _folders(photo_ids[photo_live])

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.settings

    @property
    def photo_count(self) -> int:
        return int(self.photo_live.sum())

    @property
    def face_count(self) -> int:
        return int(self.face_live.sum())

    @classmethod
    def open(cls, folder: str | Path, attempts: int = defaults.GALLERY_OPEN_ATTEMPTS) -> Gallery:
        """Load the committed version. Retries briefly if a writer commits while we read."""
        folder = Path(folder)
        last: Exception | None = None
        for _ in range(attempts):
            manifest = layout.read_manifest(folder)
            try:
                gallery = cls._load(folder, manifest)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                last = e
                time.sleep(defaults.GALLERY_OPEN_RETRY_S)
                continue
            if layout.manifest_version(folder) in (manifest.version, None):
                return gallery
            last = None  # a newer version was committed while we read: load that one
        raise GalleryError(f"could not read the gallery at {folder}: {last or 'it kept changing'}")

    @classmethod
    def _load(cls, folder: Path, m: layout.Manifest) -> Gallery:
        got = rows.read_rows(folder, m, ("id", "removed_at"), ("photo", "box"))
        live = rows.live(got.photos["removed_at"], m.version)
        face_photo = got.faces["photo"].astype(np.int32)
        boxes = got.faces["box"].astype(np.int32)
        return cls(folder, m, got.photos["id"], live, face_photo, boxes, _load_index(folder, m))

    def check_stage(self, stage: str | None) -> str:
        """The stage as a normalised folder id ('' for the whole gallery); StageError if it is not one."""
        raw = (stage or "").strip()
        stage = raw.rstrip("/")
        if not stage:
            return ""
        parts = stage.split("/")
        if raw.startswith("/") or "\\" in stage or "\x00" in stage or any(p in ("", ".", "..") for p in parts):
            raise StageError(f"stage {stage!r} must be a folder inside the gallery, like 'Day-1/Morning'")
        if stage not in self.folders:
            raise StageError(f"unknown stage {stage!r}: no photos under that folder in the gallery")
        return stage

    def search(
        self,
        descriptor: np.ndarray,
        stage: str | None = "",
        threshold: float = DEFAULT_THRESHOLD,
        limit: int | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> list[Match]:
        """Photos with a face within the threshold of `descriptor`, best first, one entry per photo.

        stage: only photos under that folder (at folder boundaries); exclude: photo ids to leave out.
        """
        threshold = check_threshold(threshold)
        stage = self.check_stage(stage)
        hits, distances = range_search(self.index, self.vectors, descriptor, threshold)
        keep = self.face_live[hits]
        if stage or exclude:
            prefix = stage + "/"
            ids = self.photo_ids[self.face_photo[hits]]
            keep &= np.fromiter(
                ((not stage or i.startswith(prefix)) and i not in exclude for i in ids), bool, len(ids)
            )
        return best_per_photo(hits[keep], distances[keep], self.face_photo, self.photo_ids, self.face_boxes, limit)

    def stats(self) -> GalleryStats:
        live_ids = self.photo_ids[self.photo_live]
        stages: dict[str, int] = {}
        for pid in live_ids:
            stage = pid.rpartition("/")[0]
            stages[stage] = stages.get(stage, 0) + 1
        with_faces = len(np.unique(self.face_photo[self.face_live]))
        return GalleryStats(self.version, len(live_ids), self.face_count, len(live_ids) - with_faces, stages)


def _load_index(folder: Path, m: layout.Manifest) -> faiss.IndexFlatL2:
    """The index file's rows, then committed rows written after it, read from the row files."""
    if m.index and m.index_faces <= m.faces and (folder / m.index).is_file():
        index = faiss.read_index(str(folder / m.index))
        if index.ntotal != m.index_faces or index.d != 128:
            raise GalleryError(f"{m.index} holds {index.ntotal} faces, the manifest says {m.index_faces}")
    else:
        index = faiss.IndexFlatL2(128)
    for block in rows.iter_descriptors(folder, m, start=index.ntotal):
        index.add(block)
    return index


def _index_vectors(index: faiss.IndexFlatL2) -> np.ndarray:
    """The index's own float32 rows, as a numpy view (no copy)."""
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _folders(ids: np.ndarray) -> frozenset[str]:
    """Every folder that holds a photo, directly or below it: the valid stages."""
    out: set[str] = set()
    for pid in ids:
        folder = pid.rpartition("/")[0]
        while folder and folder not in out:
            out.add(folder)
            folder = folder.rpartition("/")[0]
    return frozenset(out)
