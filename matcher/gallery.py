"""A gallery opened for searching: the committed version, held in memory.

`Gallery.open(folder)` loads what the manifest names: photo and face metadata from the row files (only
the committed rows, see `matcher.rows`), and the descriptors (`matcher.scan.Descriptors`): the FAISS
index file's rows memory-mapped read-only, so that the worker processes of a machine share one copy
through the page cache, then the committed rows added after that file, read from the row files. Any
number of readers may open a gallery while its one writer (`matcher.writer.GalleryWriter`) works; a
reader never sees a half-written version. The files: docs/gallery-format.md.

At load, the face rows of every folder (a stage) are noted as row ranges (`Gallery.scopes`), so a search
with a stage scans that stage's rows only (`matcher.scan`); a search of the whole gallery scans the index
rows' 8-bit codes where the manifest names a sound codes file (`matcher.coarse`), with the same answers.
`Gallery.scan` is the one search of the rows, for `search` and for query expansion alike; `Gallery.visible`
decides which faces it may show: those of live photos, less the faces of people who asked to be forgotten
(`matcher.forgotten`), found once at load by one scan per forgotten descriptor (`face_hidden`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from matcher import coarse, defaults, forgotten, index_file, layout, rows, scan
from matcher.errors import GalleryError, StageError
from matcher.search import (
    DEFAULT_THRESHOLD,
    Match,
    best_per_photo,
    check_threshold,
    range_search,
)

log = logging.getLogger("fsw.gallery")


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
        vectors: scan.Descriptors | np.ndarray,
        scanner: scan.Scanner | None = None,
        forgets: Sequence[forgotten.Forgotten] = (),
    ):
        self.folder = folder
        self.manifest = manifest
        self.photo_ids = photo_ids
        self.photo_live = photo_live
        self.face_photo = face_photo
        self.face_boxes = face_boxes
        if not isinstance(vectors, scan.Descriptors):
            vectors = scan.Descriptors([np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, scan.DIM)])
        self.vectors = vectors
        self.scanner = scanner or scan.CpuScan(vectors)
        self.face_live = photo_live[face_photo] if len(face_photo) else np.zeros(0, bool)
        self.scopes = stage_scopes(photo_ids, photo_live, face_photo)
        self.folders = frozenset(self.scopes)
        self._counts = (int(self.photo_live.sum()), int(self.face_live.sum()))
        self.forgotten: tuple[forgotten.Forgotten, ...] = ()
        self.face_hidden = np.zeros(len(self.face_live), bool)
        self.face_shown = self.face_live
        self._hide(forgets)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.settings

    @property
    def photo_count(self) -> int:
        return self._counts[0]

    @property
    def face_count(self) -> int:
        return self._counts[1]

    @classmethod
    def open(
        cls,
        folder: str | Path,
        attempts: int = defaults.GALLERY_OPEN_ATTEMPTS,
        gpu: int | None = None,
        on_gpu_fallback: Callable[[], None] | None = None,
    ) -> Gallery:
        """Load the committed version. Retries briefly if a writer commits while we read.

        gpu: search on that CUDA device when FAISS has GPU support (`matcher.gpu`), falling back to the
        CPU on any CUDA error, each time reported to `on_gpu_fallback`; None, or no GPU FAISS: the CPU.
        """
        folder = Path(folder)
        last: Exception | None = None
        for _ in range(attempts):
            manifest = layout.read_manifest(folder)
            try:
                gallery = cls._load(folder, manifest, gpu, on_gpu_fallback)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                if layout.read_manifest(folder) == manifest:
                    # the same version fails the same way again: no retry can help (a damaged file)
                    raise GalleryError(f"could not read the gallery at {folder}: {e}") from e
                last = e  # a writer committed while we read, and deleted a file we needed: load the new one
                continue
            if layout.manifest_version(folder) in (manifest.version, None):
                _return_freed_memory()
                return gallery
            last = None  # a newer version was committed while we read: load that one
        raise GalleryError(f"could not read the gallery at {folder}: {last or 'it kept changing'}")

    @classmethod
    def _load(
        cls, folder: Path, m: layout.Manifest, gpu: int | None, on_gpu_fallback: Callable[[], None] | None
    ) -> Gallery:
        got = rows.read_rows(folder, m, ("id", "removed_at"), ("photo", "box"))
        live = rows.live(got.photos["removed_at"], m.version)
        face_photo = got.faces["photo"].astype(np.int32)
        boxes = got.faces["box"].astype(np.int32, copy=False)
        vectors, mapped = _load_descriptors(folder, m)
        scanner = None
        if gpu is not None:
            from matcher.gpu import gpu_scanner

            scanner = gpu_scanner(vectors, gpu, on_gpu_fallback)
        elif mapped:
            scanner = _coarse_scanner(folder, m, vectors)
        forgets = forgotten.read(folder, m)
        return cls(folder, m, got.photos["id"], live, face_photo, boxes, vectors, scanner, forgets)

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

    def visible(self, rows: np.ndarray) -> np.ndarray:
        """Which of these face rows a search may return or learn from: the one place a face is hidden.

        The faces of photos this version shows (`face_live`) that no forgotten descriptor hides
        (`face_hidden`). A face hidden here is neither returned nor used by query expansion, since both
        search through `scan`.
        """
        return self.face_shown[rows]

    def hiding(self, forgets: Sequence[forgotten.Forgotten]) -> Gallery:
        """This version with the faces of more forgotten entries hidden too (the portal's, from Redis, that
        the gallery does not hold yet): a view sharing the descriptors; entries it holds are skipped."""
        view = copy.copy(self)
        view._hide(forgets)
        return view

    def faces_hidden_by(self, entry: forgotten.Forgotten) -> int:
        """How many faces of this version's photos `entry` hides (whether or not it is applied here)."""
        return int(self.face_live[forgotten.hidden_rows(self.scanner, self.vectors, entry)].sum())

    def _hide(self, forgets: Sequence[forgotten.Forgotten]) -> None:
        held = {e.id for e in self.forgotten}
        more = [e for e in forgets if e.id not in held]
        if more:
            self.forgotten = (*self.forgotten, *more)
            self.face_hidden = self.face_hidden | forgotten.hidden_mask(self.scanner, self.vectors, more)
            self.face_shown = self.face_live & ~self.face_hidden

    def scan(self, descriptor: np.ndarray, threshold: float, stage: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Visible face rows within `threshold` of `descriptor`, in the stage's rows ('' for all), with
        their exact distances (unordered). `stage` must have passed `check_stage`."""
        scope = self.scopes[stage] if stage else None
        rows, distances = range_search(self.scanner, self.vectors, descriptor, threshold, scope)
        keep = self.visible(rows)
        return rows[keep], distances[keep]

    def search(
        self,
        descriptor: np.ndarray,
        stage: str | None = "",
        threshold: float = DEFAULT_THRESHOLD,
        limit: int | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> list[Match]:
        """Photos with a face within the threshold of `descriptor`, best first, one entry per photo.

        stage: only photos under that folder (at folder boundaries), and only its rows are scanned;
        exclude: photo ids to leave out.
        """
        threshold = check_threshold(threshold)
        stage = self.check_stage(stage)
        hits, distances = self.scan(descriptor, threshold, stage)
        return self.matches(hits, distances, limit, exclude)

    def matches(
        self,
        hits: np.ndarray,
        distances: np.ndarray,
        limit: int | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> list[Match]:
        """The answer of a `scan`'s hits: one entry per photo (its closest face), best first, less `exclude`."""
        if exclude:
            ids = self.photo_ids[self.face_photo[hits]]
            keep = np.fromiter((i not in exclude for i in ids), bool, len(ids))
            hits, distances = hits[keep], distances[keep]
        return best_per_photo(hits, distances, self.face_photo, self.photo_ids, self.face_boxes, limit)

    def stats(self) -> GalleryStats:
        live_ids = self.photo_ids[self.photo_live]
        stages: dict[str, int] = {}
        for pid in live_ids:
            stage = pid.rpartition("/")[0]
            stages[stage] = stages.get(stage, 0) + 1
        with_faces = len(np.unique(self.face_photo[self.face_live]))
        return GalleryStats(self.version, len(live_ids), self.face_count, len(live_ids) - with_faces, stages)


def _load_descriptors(folder: Path, m: layout.Manifest) -> tuple[scan.Descriptors, bool]:
    """The index file's rows, memory-mapped, then committed rows written after it, read from the row files;
    and whether the index file was read. An index file that is not the one the manifest recorded is not
    read (`matcher.index_file`): all rows then come from the row files, and a warning says so."""
    blocks, mapped = [], None
    why = index_file.problem(folder, m) if m.index else None
    if why is not None:
        log.warning("gallery at %s: %s; its %d descriptors are read from the row files instead "
                    "(`fsw-index verify` checks the gallery)", folder, why, m.index_faces)
    elif m.index:
        mapped = index_file.read(folder / m.index)
        if mapped.ntotal != m.index_faces or mapped.d != scan.DIM:
            raise GalleryError(f"{m.index} holds {mapped.ntotal} faces, the manifest says {m.index_faces}")
        if mapped.ntotal:
            block = faiss.rev_swig_ptr(mapped.get_xb(), mapped.ntotal * mapped.d).reshape(-1, mapped.d)
            block.flags.writeable = False  # the pages are mapped read-only: a write would crash the process
            blocks.append(scan.touch_pages(block))
    tail = list(rows.iter_descriptors(folder, m, start=mapped.ntotal if mapped is not None else 0))
    if tail:
        blocks.append(np.concatenate(tail) if len(tail) > 1 else tail[0])
    return scan.Descriptors(blocks, keep=mapped), mapped is not None


def _coarse_scanner(folder: Path, m: layout.Manifest, vectors: scan.Descriptors) -> scan.Scanner | None:
    """The scan on the index rows' 8-bit codes (`matcher.coarse`) when the manifest names a sound codes file;
    None (the float32 scan) otherwise, with a warning when the file named is not the one recorded."""
    if not m.coarse or not m.index_faces:
        return None
    why = coarse.problem(folder, m)
    codes = None
    if why is None:
        try:
            codes = coarse.read(folder / m.coarse["file"], m.index_faces)
        except (RuntimeError, ValueError) as e:
            why = f"{m.coarse['file']}: {str(e).splitlines()[0]}"
    if codes is None:
        log.warning("gallery at %s: %s; whole-gallery searches read the float32 descriptors instead "
                    "(`fsw-index verify` checks the gallery)", folder, why)
        return None
    coarse.touch(codes)
    return coarse.CoarseScan(codes, m.coarse["error"], vectors)


def _return_freed_memory() -> None:
    """Give the operating system back the heap that loading freed (the row files' columns as read, before
    conversion): glibc keeps it otherwise, and every worker process would hold it unused (17 MB at 1M
    faces, a sixth of a worker's own memory). Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def stage_scopes(photo_ids: np.ndarray, photo_live: np.ndarray, face_photo: np.ndarray) -> dict[str, scan.Ranges]:
    """Every folder that holds a live photo, directly or below it (the valid stages), and its live face
    rows as sorted row ranges: one range for a folder indexed at once, a few after `add`s and replacements."""
    codes: dict[str, int] = {}
    leaf = np.full(len(photo_ids), -1, np.int32)  # each live photo's folder, as a code; -1 for removed ones
    for row in np.flatnonzero(photo_live).tolist():
        leaf[row] = codes.setdefault(photo_ids[row].rpartition("/")[0], len(codes))
    starts, ends, owner = scan.runs(leaf[face_photo] if len(face_photo) else np.zeros(0, np.int32))
    by_folder: dict[str, list[np.ndarray]] = {}
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(codes) + 1))
    for folder, code in codes.items():
        at = order[bounds[code] : bounds[code + 1]]
        ranges = np.stack([starts[at], ends[at]], axis=1)
        while folder:
            by_folder.setdefault(folder, []).append(ranges)
            folder = folder.rpartition("/")[0]
    return {folder: scan.merge(parts) for folder, parts in by_folder.items()}
