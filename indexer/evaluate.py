"""`fsw-index eval`: how well fsw finds a person's photos, measured on a labelled set.

The run ties the parts together: the labels (`indexer.labels`), a gallery of the labelled photos, the
queries searched by the job's own code (`matcher.query`, `matcher.expansion`, `Gallery.search`), the
counts (`indexer.scoring`, pure functions of the answers) and the report (`indexer.report`).

The gallery: with no gallery folder given, the labelled gallery photos are indexed in place, into a
temporary gallery whose photo root is the CSV file's folder (so photo ids are the `file` column), and it
is deleted afterwards. A folder that holds no gallery yet is built the same way and kept for reuse; an
existing gallery (of these photos, or an event's gallery that contains them) is opened read-only, and
the labelled photos are found in it by content hash, whatever their ids. Only labelled photos are scored;
photos of an event gallery without labels count as "unlabelled" and are neither right nor wrong.

The queries run as a worker job runs them: each selfie is encoded once with `selfie_descriptor`, then
searched with the job's expansion and search. Since a match is `similarity > threshold`, a search at the
lowest threshold holds the answer at every higher one. Query expansion makes the query depend on the
threshold (its confident bar is threshold + margin), so at each threshold the expanded query is formed
again (`expand_query`), and one search is made per distinct set of faces averaged in. At the default
threshold every query's derived answer is checked against `search_descriptor`, the job's own search; a
difference is a bug and stops the run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.defaults import EVAL_THRESHOLDS
from indexer.labels import Label, LabelsError, read_labels
from indexer.pipeline import Progress, index_photos
from indexer.report import Report
from indexer.scoring import Answer, Outcome, Row, Truth, above, count, details, face_checks
from matcher import layout, rows
from matcher.defaults import EXPANSION_MARGIN, EXPANSION_MIN_MATCHES
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import NoFaceError, SettingsMismatchError
from matcher.expansion import expand_query
from matcher.gallery import Gallery
from matcher.query import search_descriptor, selfie_descriptor
from matcher.search import DEFAULT_THRESHOLD, check_threshold

# settings of the process that searches, not of the gallery: the eval's own, whatever the gallery recorded
_PER_PROCESS = ("engine", "threads", "selfie_max_side", "selfie_jitters", "selfie_mirror", "selfie_expansion")


@dataclass(frozen=True)
class QueryInput:
    file: str
    person: str  # a name, or 'none'
    descriptor: np.ndarray | None  # None: no face found in it


@dataclass(frozen=True)
class Faces:
    """Hand-made gallery faces (a test's): descriptors and, for each, its photo (an index into `ids`)."""

    vectors: np.ndarray  # float32 (n, 128)
    photo: np.ndarray  # int (n,)
    ids: np.ndarray  # photo ids

    @classmethod
    def of(cls, gallery: Gallery) -> Faces:
        """A copy of a gallery's live faces."""
        live = np.flatnonzero(gallery.face_live)
        return cls(gallery.vectors[live], gallery.face_photo[live].astype(np.int64), gallery.photo_ids)

    def gallery(self) -> Gallery:
        """These faces as a gallery held in memory (every photo live, no boxes), to be searched as any."""
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1, 128)
        ids = np.asarray(self.ids, dtype=object)
        return Gallery(Path(), layout.Manifest(), ids, np.ones(len(ids), bool), np.asarray(self.photo, np.int32),
                       np.zeros((len(vectors), 4), np.int32), vectors)


def answers(faces: Faces | Gallery, descriptor: np.ndarray, thresholds: Sequence[float],
            expand: bool) -> dict[float, Answer]:
    """The job's answer (`search_descriptor`) at each threshold, from searches at the lowest."""
    gallery = faces.gallery() if isinstance(faces, Faces) else faces
    lowest = min(thresholds)
    searched: dict[tuple[int, ...], dict[str, float]] = {}  # faces averaged in -> {photo id: similarity}
    out = {}
    for t in thresholds:
        query, used = descriptor, ()
        if expand:
            e = expand_query(gallery, descriptor, t)
            query, used = e.descriptor, tuple(sorted(e.used.tolist()))
        if used not in searched:
            searched[used] = {m.id: m.similarity for m in gallery.search(query, "", lowest)}
        out[t] = Answer(above(searched[used], t), len(used))
    return out


def outcomes(faces: Faces | Gallery, queries: Sequence[QueryInput], thresholds: Sequence[float],
             expand: bool) -> list[Outcome]:
    """Each query's answers at every threshold (none for a query without a face)."""
    gallery = faces.gallery() if isinstance(faces, Faces) else faces
    return [Outcome(q.file, q.person, q.descriptor is not None,
                    answers(gallery, q.descriptor, thresholds, expand) if q.descriptor is not None else {})
            for q in queries]


def score(
    faces: Faces | Gallery,
    truth: Truth,
    queries: Sequence[QueryInput],
    thresholds: Sequence[float] = EVAL_THRESHOLDS,
    expand: bool = True,
) -> tuple[list[Row], dict[str, dict[float, Answer]]]:
    """Counts per threshold, and each query's answers. `truth`: labelled photo id -> people in it."""
    got = outcomes(faces, queries, thresholds, expand)
    return count(truth, got, thresholds), {o.file: dict(o.answers) for o in got}


def evaluate(
    labels_csv: str | Path,
    gallery: str | Path | None = None,
    settings: EncoderSettings | None = None,
    default_threshold: float = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] = EVAL_THRESHOLDS,
    jobs: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Evaluate the labelled set at `labels_csv` (see the module's docstring).

    gallery: None for a temporary one; a folder to build (kept) or reuse. settings: for a gallery built
    here, and the per-process selfie settings (jitters, mirror, expansion, engine) for the queries; a
    reused gallery must have been built with the same recorded settings. jobs: encoder processes for a
    build.
    """
    labels_csv = Path(labels_csv)
    settings = settings or EncoderSettings()
    default_threshold = check_threshold(default_threshold)
    thresholds = sorted({round(check_threshold(t), 4) for t in (*thresholds, default_threshold)})
    labels = read_labels(labels_csv)
    photos = [x for x in labels if x.split == "gallery"]
    with _gallery(labels, labels_csv, gallery, settings, jobs, on_progress) as folder:
        g = Gallery.open(folder)
        if gallery is not None:
            _check_recorded(g, settings, folder)
        ids = _labelled_ids(g, folder, photos)
        truth = {ids[x.file]: x.people for x in photos}
        query_settings = EncoderSettings.from_recorded(g.settings, **{k: getattr(settings, k) for k in _PER_PROCESS})
        queries, encode_ms = _encode_queries(Encoder(query_settings), [x for x in labels if x.split == "query"])
        expand = query_settings.selfie_expansion
        got = outcomes(g, queries, thresholds, expand)
        search_ms = _check_against_job_path(g, queries, got, default_threshold, expand)
        checks = face_checks(truth, _faces_per_photo(g, truth))
        where = "temporary, built in place" if gallery is None else str(gallery)
    return Report(
        labels=str(labels_csv),
        gallery=where,
        settings=query_settings.as_dict(),
        default_threshold=default_threshold,
        rows=count(truth, got, thresholds),
        queries=details(truth, got, default_threshold),
        gallery_checks=checks,
        timing_ms={
            "selfie_encode_median": round(statistics.median(encode_ms), 1) if encode_ms else 0.0,
            "search_median": round(statistics.median(search_ms), 2) if search_ms else 0.0,
        },
        expansion={"on": expand, "margin": EXPANSION_MARGIN, "min_matches": EXPANSION_MIN_MATCHES},
    )


@contextmanager
def _gallery(
    labels: list[Label],
    labels_csv: Path,
    gallery: str | Path | None,
    settings: EncoderSettings,
    jobs: int | None,
    on_progress: Callable[[Progress], None] | None,
) -> Iterator[Path]:
    if gallery is not None and layout.is_gallery(gallery):
        yield Path(gallery)
        return
    with tempfile.TemporaryDirectory(prefix="fsw-eval-") as tmp:
        folder = Path(gallery) if gallery is not None else Path(tmp) / "gallery"
        root = labels_csv.parent.resolve()
        photos = [x for x in labels if x.split == "gallery"]
        outside = [x.file for x in photos if not x.path.resolve().is_relative_to(root)]
        if outside:
            raise LabelsError(f"gallery photos must lie under the labels' folder {root} to be indexed in place "
                              f"({outside[0]} does not): move them, or pass --gallery with a gallery that holds them")
        summary = index_photos(folder, [x.path for x in photos], settings, photo_root=root, jobs=jobs,
                               on_progress=on_progress)
        if summary.skipped:
            s = summary.skipped[0]
            raise LabelsError(f"{len(summary.skipped)} labelled gallery photos could not be indexed, "
                              f"e.g. {s['path']}: {s['reason']}")
        yield folder


def _check_recorded(g: Gallery, settings: EncoderSettings, folder: Path) -> None:
    want, have = settings.recorded(), g.settings
    differ = [k for k in layout.ENCODER_FIELDS if k in have and have[k] != want[k]]
    if differ:
        was = ", ".join(f"{k}={have[k]}" for k in differ)
        raise SettingsMismatchError(f"the gallery at {folder} was built with {was}: evaluate it with those "
                                    "settings, or give another --gallery folder to build one with yours")


def _labelled_ids(g: Gallery, folder: Path, photos: list[Label]) -> dict[str, str]:
    """Labelled file -> its photo id in the gallery, found by content hash."""
    got = rows.read_rows(folder, g.manifest, ("id", "sha256", "removed_at"), ())
    live = rows.live(got.photos["removed_at"], g.version)
    by_hash = {h.decode(): str(pid) for pid, h, ok in zip(got.photos["id"], got.photos["sha256"], live,
                                                          strict=True) if ok}
    out: dict[str, str] = {}
    missing: list[str] = []
    for x in photos:
        pid = by_hash.get(layout.file_sha256(x.path))
        if pid is None:
            missing.append(x.file)
        elif pid in out.values():
            raise LabelsError(f"{x.file} is the same photo as another gallery row: label it once")
        else:
            out[x.file] = pid
    if missing:
        raise LabelsError(f"{len(missing)} labelled gallery photos are not in the gallery at {folder} "
                          f"(e.g. {missing[0]}): give another --gallery folder, or none for a temporary one")
    return out


def _encode_queries(encoder: Encoder, queries: list[Label]) -> tuple[list[QueryInput], list[float]]:
    out, ms = [], []
    for q in queries:
        started = time.perf_counter()
        try:
            descriptor: np.ndarray | None = selfie_descriptor(encoder, q.path)
        except NoFaceError:
            descriptor = None
        ms.append((time.perf_counter() - started) * 1000)
        out.append(QueryInput(q.file, q.person, descriptor))
    return out, ms


def _check_against_job_path(
    g: Gallery, queries: list[QueryInput], got: list[Outcome], threshold: float, expand: bool
) -> list[float]:
    """Each query's derived answer at `threshold` must be what the job's search returns. The search times."""
    ms = []
    for q, outcome in zip(queries, got, strict=True):
        if q.descriptor is None:
            continue
        started = time.perf_counter()
        job = {m.id: m.similarity for m in search_descriptor(g, q.descriptor, "", threshold, expand=expand)}
        ms.append((time.perf_counter() - started) * 1000)
        derived = outcome.answers[threshold].photos
        if job.keys() != derived.keys() or any(abs(job[k] - derived[k]) > 1e-6 for k in job):
            raise RuntimeError(f"eval derived {sorted(derived)} for {q.file} at {threshold}, the job path returns "
                               f"{sorted(job)}: a bug in indexer.evaluate")
    return ms


def _faces_per_photo(g: Gallery, truth: Truth) -> dict[str, int]:
    """Faces the gallery holds for each labelled photo."""
    index = {str(pid): i for i, pid in enumerate(g.photo_ids)}
    counts = np.bincount(g.face_photo[g.face_live], minlength=len(g.photo_ids))
    return {pid: int(counts[index[pid]]) for pid in truth}
