"""Checking a gallery folder's integrity: what `fsw-index verify` runs, and the crash tests after each kill.

`verify_gallery(folder)` returns one line per problem, and nothing for a sound gallery: the manifest is
readable and of a known format with its settings; every file it names is there and readable; the row
files hold at least the rows it names; the FAISS index matches its checksum, holds `index_faces`
vectors, and they equal the descriptors they cache; face rows name photo rows that exist, and each
photo's face count agrees with them; the forgotten faces' file matches its checksum. Files a writer
that died left behind are not problems: the next writer removes them. The check reads, never writes,
and needs no lock.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from matcher import coarse, defaults, forgotten, index_file, layout, rows
from matcher.errors import GalleryError, ManifestError


@dataclass
class Verdict:
    """What a check found: problems (empty when sound) and the figures of the version checked."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    version: int | None = None
    photos: int = 0
    live_photos: int = 0
    faces: int = 0
    files: int = 0
    index: str | None = None
    index_faces: int = 0
    uncommitted_rows: int = 0  # rows past the manifest's counts, from a writer that died

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The one-line OK summary."""
        index = f"index {self.index} ({self.index_faces} faces)" if self.index else "no index file"
        extra = f"; {self.uncommitted_rows} uncommitted rows of an interrupted writer" if self.uncommitted_rows else ""
        removed = self.photos - self.live_photos
        return (f"OK: {self.folder}: version {self.version}, {self.live_photos} photos ({removed} removed), "
                f"{self.faces} faces in {self.files} row file{'s' if self.files != 1 else ''}, {index}{extra}")


def verify_gallery(folder: str | os.PathLike[str]) -> list[str]:
    """The problems of the gallery at `folder`, one line each; an empty list for a sound gallery."""
    return check_gallery(folder).problems


def check_gallery(folder: str | os.PathLike[str], attempts: int = defaults.VERIFY_ATTEMPTS) -> Verdict:
    """Check the committed version; checked again when a writer commits a new one meanwhile."""
    folder = Path(folder)
    verdict = Verdict(folder)
    for _ in range(attempts):
        before = layout.manifest_version(folder)
        verdict = _check(folder)
        if layout.manifest_version(folder) == before:
            break
    return verdict


def _check(folder: Path) -> Verdict:
    v = Verdict(folder)
    m = _manifest(folder, v.problems)
    if m is None:
        return v
    v.version, v.photos, v.faces, v.index, v.index_faces = m.version, m.photos, m.faces, m.index, m.index_faces
    missing = [k for k in layout.SETTINGS_KEYS if k not in m.settings]
    if m.settings and missing:
        v.problems.append(f"{layout.MANIFEST_NAME}: settings lack {', '.join(missing)}")
    try:
        files = rows.data_files(m)
    except (KeyError, TypeError, ValueError, GalleryError) as e:
        v.problems.append(f"{layout.MANIFEST_NAME}: segments are malformed ({e})")
        return v
    v.files = len(files)
    sound = [_check_file(folder, f, m, v) for f in files]
    descriptors = _check_rows(folder, m, v) if all(sound) else None
    _check_index(folder, m, v, descriptors)
    _check_coarse(folder, m, v, descriptors)
    _check_forgotten(folder, m, v)
    return v


def _check_forgotten(folder: Path, m: layout.Manifest, v: Verdict) -> None:
    """The forgotten faces' file, when the manifest names one: there, of its sha256, and readable."""
    try:
        forgotten.read(folder, m)
    except OSError as e:
        v.problems.append(f"{m.forgotten}: named by the manifest but unreadable ({e.strerror or e})")
    except GalleryError as e:
        v.problems.append(str(e))


def _manifest(folder: Path, problems: list[str]) -> layout.Manifest | None:
    try:
        m = layout.read_manifest(folder)
    except ManifestError as e:
        problems.append(e.problem)
        return None
    if not m.settings:
        problems.append(f"{layout.MANIFEST_NAME} records no encoder settings")
    return m


def _check_file(folder: Path, f: rows.DataFile, m: layout.Manifest, v: Verdict) -> bool:
    """Structure and row counts of one row file; False when its rows cannot be read."""
    path = folder / f.name
    if not path.is_file():
        v.problems.append(f"{f.name}: named by the manifest but missing")
        return False
    try:
        with rows.open_h5(path) as h5:
            absent = [f"{g}/{c}" for g, cols in (("photos", rows.PHOTO_COLUMNS), ("faces", rows.FACE_COLUMNS))
                      for c in cols if f"{g}/{c}" not in h5]
            if absent:
                v.problems.append(f"{f.name}: lacks {', '.join(absent)}")
                return False
            ok = True
            for group, need in (("photos", f.photos), ("faces", f.faces)):
                for name, ds in h5[group].items():
                    have = ds.shape[0]
                    if have < need or (have > need and f.name != layout.H5_NAME):
                        v.problems.append(f"{f.name}: {group}/{name} holds {have} rows, the manifest names {need}")
                        ok = False
                    elif have > need:
                        v.uncommitted_rows = max(v.uncommitted_rows, have - need)
            if f.removals and ("removals/row" not in h5 or h5["removals/row"].shape[0] < f.removals):
                v.problems.append(f"{f.name}: holds fewer removals than the manifest's {f.removals}")
                ok = False
            recorded = h5.attrs.get("settings")
            if recorded is not None and m.settings and json.loads(recorded) != m.settings:
                v.problems.append(f"{f.name}: written with other encoder settings than the manifest records")
            return ok
    except (OSError, ValueError, KeyError) as e:
        v.problems.append(f"{f.name}: not a readable HDF5 file ({e})")
        return False


def _check_rows(folder: Path, m: layout.Manifest, v: Verdict) -> np.ndarray | None:
    """Checks across the committed rows; returns their descriptors (None when unreadable)."""
    try:
        got = rows.read_rows(folder, m, ("id", "faces", "removed_at"), ("photo",))
        descriptors = np.concatenate([np.zeros((0, 128), np.float32), *rows.iter_descriptors(folder, m)])
    except (OSError, ValueError, KeyError, RuntimeError, GalleryError) as e:
        v.problems.append(f"row files: committed rows cannot be read ({e})")
        return None
    owner = got.faces["photo"]
    outside = np.flatnonzero((owner < 0) | (owner >= m.photos))
    if len(outside):
        r = int(outside[0])
        v.problems.append(f"{len(outside)} face rows name photo rows outside 0..{m.photos - 1} "
                          f"(first: face row {r} -> photo row {int(owner[r])})")
    else:
        counted = np.bincount(owner, minlength=m.photos)[: m.photos]
        disagree = np.flatnonzero(counted != got.photos["faces"])
        if len(disagree):
            r = int(disagree[0])
            v.problems.append(f"{len(disagree)} photos' face counts disagree with their face rows (first: "
                              f"{got.photos['id'][r]} says {int(got.photos['faces'][r])}, rows hold {counted[r]})")
    if len(descriptors) != m.faces:
        v.problems.append(f"row files hold {len(descriptors)} descriptors, the manifest names {m.faces} faces")
    elif not np.isfinite(descriptors).all():
        v.problems.append(f"{int((~np.isfinite(descriptors).all(axis=1)).sum())} descriptors are not finite")
    live = rows.live(got.photos["removed_at"], m.version)
    v.live_photos = int(live.sum())
    ids, counts = np.unique(got.photos["id"][live].astype(str), return_counts=True)
    if (counts > 1).any():
        v.problems.append(f"photo id {ids[counts > 1][0]} is live in {int(counts.max())} rows")
    return descriptors


def _check_index(folder: Path, m: layout.Manifest, v: Verdict, descriptors: np.ndarray | None) -> None:
    if m.index is None:
        if m.index_faces:
            v.problems.append(f"{layout.MANIFEST_NAME}: index_faces is {m.index_faces} but it names no index file")
        return
    path = folder / m.index
    # a file that is not the one recorded is not read: its header could ask FAISS for any amount of memory
    problem = index_file.problem(folder, m)
    if problem is not None:
        v.problems.append(problem)
        return
    try:
        index = index_file.read(path)
    except (RuntimeError, GalleryError) as e:
        v.problems.append(f"{m.index}: not a readable FAISS index ({str(e).splitlines()[0]})")
        return
    if index.d != 128 or index.ntotal != m.index_faces:
        v.problems.append(f"{m.index}: holds {index.ntotal} vectors of {index.d} dimensions, the manifest names "
                          f"{m.index_faces} of 128")
        return
    if descriptors is None or len(descriptors) < m.index_faces:
        return
    vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * 128).reshape(index.ntotal, 128)
    differ = np.flatnonzero((vectors != descriptors[: m.index_faces]).any(axis=1))
    if len(differ):
        v.problems.append(f"{m.index}: {len(differ)} of its {index.ntotal} vectors differ from the descriptors in "
                          f"the row files (first: face row {int(differ[0])})")


def _check_coarse(folder: Path, m: layout.Manifest, v: Verdict, descriptors: np.ndarray | None) -> None:
    """The codes file (`matcher.coarse`): the one recorded, of the index's rows, each row within the recorded
    error of its code (else a search on the codes could miss a match)."""
    if not m.coarse:
        return
    name = m.coarse["file"]
    problem = coarse.problem(folder, m)
    if problem is not None:
        v.problems.append(problem)
        return
    try:
        codes = coarse.read(folder / name, m.index_faces)
    except (RuntimeError, ValueError) as e:
        v.problems.append(f"{name}: not readable as the index rows' codes ({str(e).splitlines()[0]})")
        return
    if descriptors is None or len(descriptors) < m.index_faces:
        return
    worst = 0.0
    for lo in range(0, m.index_faces, 1 << 16):
        hi = min(lo + (1 << 16), m.index_faces)
        projected = codes.project(descriptors[lo:hi]).astype(np.float64)
        worst = max(worst, float(np.sqrt(((codes.decoded(lo, hi) - projected) ** 2).sum(axis=1)).max()))
    # the writer projected the rows in its own blocks: float32 rounding may differ by far less than this
    if worst > m.coarse["error"] * (1 + 1e-5) + 1e-6:
        v.problems.append(f"{name}: a row's projection lies {worst:.4f} from its code, beyond the recorded error "
                          f"{m.coarse['error']:.4f}: its codes are not those of the row files")
