"""How well fsw finds a person's photos, measured on a labelled set: what `fsw-index eval` runs.

The labelled set: a CSV file of images and who is in them (`indexer.labels` describes it).

The gallery: with no gallery folder given, the labelled gallery photos are indexed in place, into a
temporary gallery whose photo root is the CSV file's folder (so photo ids are the `file` column), and it
is deleted afterwards. A folder that holds no gallery yet is built the same way and kept for reuse; an
existing gallery (of these photos, or an event's gallery that contains them) is opened read-only, and
the labelled photos are found in it by content hash, whatever their ids. Only labelled photos are scored;
photos of an event gallery without labels count as "unlabelled" and are neither right nor wrong.

The queries run as a worker job runs them (`matcher.query`): each selfie is encoded once with
`selfie_descriptor`; the search uses the same rule and the same expansion (`matcher.expansion.refine`).
Since a match is `similarity > threshold`, one exhaustive search at the lowest threshold gives the
results at every threshold. Query expansion makes the second search depend on the threshold (its
confident bar is threshold + margin), so at each threshold the expanded query is formed again, and one
search is made per distinct set of faces averaged in. At the default threshold every query's derived
answer is checked against `search_descriptor`, the job's own search; a difference is a bug and stops
the run.

Counts, per threshold: photos found of those that hold the query's person (recall); wrong photos
(returned but not holding the person) and their rate over the (query, photo) pairs where the photo does
not hold the person; queries answered perfectly (exactly their person's photos); strangers given no
photo; faceless queries refused (no face found) or given no photo.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.labels import NOT_PEOPLE, Label, LabelsError, read_labels
from indexer.pipeline import Progress, index_photos
from matcher import expansion, layout, store
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import NoFaceError, SettingsMismatchError
from matcher.expansion import best_face_per_photo, refine
from matcher.gallery import Gallery
from matcher.models import content_sha256
from matcher.query import search_descriptor, selfie_descriptor
from matcher.search import DEFAULT_THRESHOLD, check_threshold, exhaustive_search

THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70
_PER_PROCESS = ("engine", "threads", "selfie_max_side", "selfie_jitters", "selfie_mirror", "selfie_expansion")


@dataclass(frozen=True)
class Faces:
    """The searchable faces of a gallery: descriptors and, for each, its photo (an index into `ids`)."""

    vectors: np.ndarray  # float32 (n, 128)
    photo: np.ndarray  # int (n,)
    ids: np.ndarray  # photo ids

    @classmethod
    def of(cls, gallery: Gallery) -> Faces:
        live = np.flatnonzero(gallery.face_live)
        return cls(gallery.vectors[live], gallery.face_photo[live].astype(np.int64), gallery.photo_ids)


@dataclass(frozen=True)
class Answer:
    """What a query's job returns at one threshold: {photo id: similarity}, and faces averaged in."""

    photos: dict[str, float]
    expanded_with: int = 0


def answers(
    faces: Faces,
    descriptor: np.ndarray,
    thresholds: Sequence[float],
    expand: bool,
    margin: float = expansion.MARGIN,
    min_matches: int = expansion.MIN_MATCHES,
) -> dict[float, Answer]:
    """The job's answer at each threshold, from one search at the lowest (plus one per expanded query)."""
    lowest = min(thresholds)
    rows, distances = exhaustive_search(faces.vectors, descriptor, lowest)
    first = _photo_similarities(faces, rows, distances)
    if not expand:
        return {t: Answer(_above(first, t)) for t in thresholds}
    candidates = best_face_per_photo(rows, distances, faces.photo)
    searched: dict[tuple[int, ...], dict[str, float]] = {(): first}
    out = {}
    for t in thresholds:
        e = refine(descriptor, faces.vectors[candidates], t, margin, min_matches)
        key = tuple(sorted(int(r) for r in candidates[e.used]))
        if key not in searched:
            searched[key] = _photo_similarities(faces, *exhaustive_search(faces.vectors, e.descriptor, lowest))
        out[t] = Answer(_above(searched[key], t), len(key))
    return out


def _wanted(truth: dict[str, frozenset[str]], person: str) -> set[str]:
    """The labelled photos that hold `person` (none for a query without a face)."""
    return set() if person == "none" else {pid for pid, people in truth.items() if person in people}


def _photo_similarities(faces: Faces, rows: np.ndarray, distances: np.ndarray) -> dict[str, float]:
    best = best_face_per_photo(rows, distances, faces.photo)
    by_row = dict(zip(rows.tolist(), distances.tolist(), strict=True))
    return {str(faces.ids[faces.photo[r]]): 1.0 - by_row[int(r)] for r in best}


def _above(similarities: dict[str, float], threshold: float) -> dict[str, float]:
    return {pid: s for pid, s in similarities.items() if s > threshold}


@dataclass
class Row:
    """The counts at one threshold."""

    threshold: float
    found: int = 0
    wanted: int = 0
    wrong: int = 0
    negatives: int = 0  # (query, photo) pairs where the photo does not hold the query's person
    perfect: int = 0
    person_queries: int = 0
    strangers_ok: int = 0
    strangers: int = 0
    no_face_ok: int = 0
    no_face: int = 0
    expanded: int = 0
    unlabelled: int = 0  # photos returned that carry no label (an event gallery's other photos)

    @property
    def recall(self) -> float:
        return self.found / self.wanted if self.wanted else 0.0

    @property
    def wrong_rate(self) -> float:
        return self.wrong / self.negatives if self.negatives else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recall": round(self.recall, 4), "wrong_rate": round(self.wrong_rate, 5)}


@dataclass(frozen=True)
class QueryInput:
    file: str
    person: str  # a name, or 'none'
    descriptor: np.ndarray | None  # None: no face found in it


def score(
    faces: Faces,
    truth: dict[str, frozenset[str]],
    queries: Sequence[QueryInput],
    thresholds: Sequence[float] = THRESHOLDS,
    expand: bool = True,
    margin: float = expansion.MARGIN,
    min_matches: int = expansion.MIN_MATCHES,
) -> tuple[list[Row], dict[str, dict[float, Answer]]]:
    """Counts per threshold, and each query's answers. `truth`: labelled photo id -> people in it."""
    rows = {t: Row(t) for t in thresholds}
    in_gallery = set().union(*truth.values()) - NOT_PEOPLE
    per_query: dict[str, dict[float, Answer]] = {}
    for q in queries:
        got = answers(faces, q.descriptor, thresholds, expand, margin, min_matches) if q.descriptor is not None else {}
        per_query[q.file] = got
        wanted = _wanted(truth, q.person)
        for t, row in rows.items():
            answer = got.get(t, Answer({}))
            returned = set(answer.photos)
            labelled = returned & truth.keys()
            row.unlabelled += len(returned - labelled)
            row.expanded += answer.expanded_with > 0
            if q.person == "none":
                row.no_face += 1
                row.no_face_ok += not returned
                continue
            row.found += len(labelled & wanted)
            row.wanted += len(wanted)
            row.wrong += len(labelled - wanted)
            row.negatives += len(truth) - len(wanted)
            if q.person in in_gallery:
                row.person_queries += 1
                row.perfect += labelled == wanted
            else:
                row.strangers += 1
                row.strangers_ok += not labelled
    return [rows[t] for t in thresholds], per_query


@dataclass
class Report:
    """An evaluation: counts per threshold, each query's outcome at the default, checks and costs."""

    labels: str
    gallery: str
    settings: dict[str, Any]
    default_threshold: float
    rows: list[Row]
    queries: list[dict[str, Any]]
    gallery_checks: dict[str, Any]
    timing_ms: dict[str, float]
    expansion: dict[str, Any] = field(default_factory=dict)

    def row(self, threshold: float) -> Row:
        return next(r for r in self.rows if abs(r.threshold - threshold) < 1e-9)

    def to_json(self) -> str:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return json.dumps(d, indent=2)

    def table(self) -> str:
        head = (f"{'threshold':>10}  {'found/wanted':>12}  {'recall':>7}  {'wrong':>5}  {'wrong rate':>10}  "
                f"{'perfect':>7}  {'strangers':>9}  {'no face':>7}  {'expanded':>8}")
        lines = [head]
        for r in self.rows:
            mark = "*" if abs(r.threshold - self.default_threshold) < 1e-9 else " "
            lines.append(
                f"{mark} {r.threshold:>8.2f}  {f'{r.found}/{r.wanted}':>12}  {r.recall:>7.1%}  {r.wrong:>5}  "
                f"{r.wrong_rate:>10.2%}  {f'{r.perfect}/{r.person_queries}':>7}  "
                f"{f'{r.strangers_ok}/{r.strangers}':>9}  {f'{r.no_face_ok}/{r.no_face}':>7}  {r.expanded:>8}"
            )
        lines.append(f"* the default threshold ({self.default_threshold}); strangers: given no photo; "
                     "no face: refused or given no photo; expanded: queries whose descriptor was refined")
        if any(r.unlabelled for r in self.rows):
            lines.append("unlabelled photos returned: " + ", ".join(f"{r.threshold:.2f}: {r.unlabelled}"
                                                                    for r in self.rows))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Recall and wrong-photo rate against threshold, the default marked (a PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [r.threshold for r in self.rows]
        fig, left = plt.subplots(figsize=(7, 4.2), dpi=110)
        right = left.twinx()
        left.plot(t, [100 * r.recall for r in self.rows], "o-", color="tab:blue", label="photos found (recall)")
        right.plot(t, [100 * r.wrong_rate for r in self.rows], "s--", color="tab:red", label="wrong-photo rate")
        left.axvline(self.default_threshold, color="grey", linestyle=":", label=f"default {self.default_threshold}")
        left.set_xlabel("threshold (a match has similarity = 1 - distance > threshold)")
        left.set_ylabel("photos found, % of those holding the person", color="tab:blue")
        right.set_ylabel("wrong photos, % of (query, other photo) pairs", color="tab:red")
        left.set_ylim(0, 105)
        right.set_ylim(0, max(5.0, 110 * max(r.wrong_rate for r in self.rows)))
        s = self.settings
        left.set_title(f"{Path(self.labels).name}: mirror {'on' if s.get('selfie_mirror') else 'off'}, "
                       f"expansion {'on' if s.get('selfie_expansion') else 'off'}, "
                       f"selfie jitters {s.get('selfie_jitters')}", fontsize=10)
        handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        left.legend(handles, [str(h.get_label()) for h in handles], loc="center left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def evaluate(
    labels_csv: str | Path,
    gallery: str | Path | None = None,
    settings: EncoderSettings | None = None,
    default_threshold: float = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] = THRESHOLDS,
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
    with _gallery(labels, labels_csv, gallery, settings, jobs, on_progress) as folder:
        g = Gallery.open(folder)
        if gallery is not None:
            _check_recorded(g, settings, folder)
        ids = _labelled_ids(g, folder, [x for x in labels if x.split == "gallery"])
        truth = {ids[x.file]: x.people for x in labels if x.split == "gallery"}
        query_settings = EncoderSettings.from_recorded(g.settings, **{k: getattr(settings, k) for k in _PER_PROCESS})
        encoder = Encoder(query_settings)
        queries, encode_ms = _encode_queries(encoder, [x for x in labels if x.split == "query"])
        faces = Faces.of(g)
        expand = query_settings.selfie_expansion
        rows, per_query = score(faces, truth, queries, thresholds, expand)
        search_ms = _check_against_job_path(g, queries, per_query, default_threshold, expand)
        checks = _gallery_checks(g, truth)
        where = "temporary, built in place" if gallery is None else str(gallery)
    details = _details(queries, per_query, truth, default_threshold)
    return Report(
        labels=str(labels_csv),
        gallery=where,
        settings=query_settings.as_dict(),
        default_threshold=default_threshold,
        rows=rows,
        queries=details,
        gallery_checks=checks,
        timing_ms={
            "selfie_encode_median": round(statistics.median(encode_ms), 1) if encode_ms else 0.0,
            "search_median": round(statistics.median(search_ms), 2) if search_ms else 0.0,
        },
        expansion={"on": expand, "margin": expansion.MARGIN, "min_matches": expansion.MIN_MATCHES},
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
    differ = [k for k in ("detector", "upsample", "jitters", "max_side") if k in have and have[k] != want[k]]
    if differ:
        was = ", ".join(f"{k}={have[k]}" for k in differ)
        raise SettingsMismatchError(f"the gallery at {folder} was built with {was}: evaluate it with those "
                                    "settings, or give another --gallery folder to build one with yours")


def _labelled_ids(g: Gallery, folder: Path, photos: list[Label]) -> dict[str, str]:
    """Labelled file -> its photo id in the gallery, found by content hash."""
    rows = store.read_rows(folder, g.manifest, ("id", "sha256", "removed_at"), ())
    live = (rows.photos["removed_at"] == 0) | (rows.photos["removed_at"] > g.version)
    by_hash = {h.decode(): str(pid) for pid, h, ok in zip(rows.photos["id"], rows.photos["sha256"], live,
                                                          strict=True) if ok}
    out: dict[str, str] = {}
    missing: list[str] = []
    for x in photos:
        pid = by_hash.get(content_sha256(x.path))
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
    g: Gallery, queries: list[QueryInput], per_query: dict[str, dict[float, Answer]], threshold: float, expand: bool
) -> list[float]:
    """Each query's derived answer at `threshold` must be what the job's search returns. The search times."""
    ms = []
    for q in queries:
        if q.descriptor is None:
            continue
        started = time.perf_counter()
        job = {m.id: m.similarity for m in search_descriptor(g, q.descriptor, "", threshold, expand=expand)}
        ms.append((time.perf_counter() - started) * 1000)
        derived = per_query[q.file][threshold].photos
        if job.keys() != derived.keys() or any(abs(job[k] - derived[k]) > 1e-6 for k in job):
            raise RuntimeError(f"eval derived {sorted(derived)} for {q.file} at {threshold}, the job path returns "
                               f"{sorted(job)}: a bug in indexer.evaluate")
    return ms


def _gallery_checks(g: Gallery, truth: dict[str, frozenset[str]]) -> dict[str, Any]:
    """Faces found against faces labelled: false faces in faceless photos, faces missed in group photos."""
    index = {str(pid): i for i, pid in enumerate(g.photo_ids)}
    counts = np.bincount(g.face_photo[g.face_live], minlength=len(g.photo_ids))
    found = {pid: int(counts[index[pid]]) for pid in truth}
    labelled = {pid: 0 if people == {"none"} else len(people) for pid, people in truth.items()}
    return {
        "faces_found": sum(found.values()),
        "faces_labelled": sum(labelled.values()),
        "false_faces_in_faceless_photos": {p: n for p, n in found.items() if labelled[p] == 0 and n},
        "photos_with_fewer_faces_than_labelled": {p: [found[p], labelled[p]] for p in truth if found[p] < labelled[p]},
        "photos_with_more_faces_than_labelled": {p: [found[p], labelled[p]] for p in truth
                                                 if labelled[p] and found[p] > labelled[p]},
    }


def _details(
    queries: list[QueryInput], per_query: dict[str, dict[float, Answer]], truth: dict[str, frozenset[str]],
    threshold: float,
) -> list[dict[str, Any]]:
    """Each query's outcome at `threshold`: photos found, missed and wrong, with similarities."""
    in_gallery = set().union(*truth.values()) - NOT_PEOPLE
    out = []
    for q in queries:
        answer = per_query[q.file].get(threshold, Answer({}))
        wanted = _wanted(truth, q.person)
        kind = "no face" if q.person == "none" else "person" if q.person in in_gallery else "stranger"
        out.append({
            "file": q.file,
            "person": q.person,
            "kind": kind,
            "face_found": q.descriptor is not None,
            "expanded_with": answer.expanded_with,
            "found": {p: round(s, 4) for p, s in sorted(answer.photos.items()) if p in wanted},
            "missed": sorted(wanted - set(answer.photos)),
            "wrong": {p: round(s, 4) for p, s in sorted(answer.photos.items()) if p in truth and p not in wanted},
        })
    return out
