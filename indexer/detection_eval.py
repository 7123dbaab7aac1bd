"""How many faces a detector finds: `fsw-index eval-detection`, recall by face width, false faces, ms a photo.

Reads a boxes CSV in place (never copies its images): a header and one row per annotated face,

    file,left,top,width,height,blur,occluded,invalid,source
    0_Parade_marchingband_1_765.jpg,345,211,4,4,2,0,0,wider-val

- `file`: the image, relative to the folder `images/` beside the CSV file (or to the CSV's own folder when
  there is no `images/`); `left,top,width,height`: the face's box in that image's pixels. Of the other
  columns only `invalid` is read (1: a face the annotators marked unusable; not counted, as WIDER FACE's
  own evaluation does). This is WIDER FACE's format as `../shared/events/boxes.csv` holds it.

Each detector in the comparison runs on every image in turn (the detectors interleaved, so load from other
processes weighs on each alike), through `Detector.photo`: the boxes a gallery build would encode. A
true face is found when a detection overlaps it by IoU >= `MIN_IOU`, one detection per face, best
overlaps first. A detection that overlaps no annotated face (valid or not) is a false one. The scoring
functions are pure (arrays in, counts out); `evaluate_detection` is the run around them.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.labels import LabelsError
from matcher.detectors import Detector, make_detector
from matcher.encoder import EncoderSettings
from matcher.images import load_image

# A detection and an annotated face overlap by at least this IoU to count as a find. The boxes scored are
# the ones the encoder gets, HOG-shaped squares (brow to chin), and WIDER FACE's are loose rectangles
# (hairline to chin): on the event set, faces >= 20 px found at IoU 0.3 / 0.4 / 0.5 were YuNet 196 / 194 /
# 187 and HOG 90 / 90 / 89 of 213, so at WIDER's usual 0.5 correct squares would count as misses.
MIN_IOU = 0.3
# Face-width buckets (px, annotated width) the recall is reported by; the last bound is open.
BUCKETS = ((0, 20), (20, 40), (40, 80), (80, None))
# Summaries: recall of faces at least this wide (the targets are >= 20 and >= 40 px).
AT_LEAST = (20, 40)


@dataclass(frozen=True)
class Truth:
    """An image's annotated faces: boxes (n, 4: left, top, width, height) and which are valid."""

    boxes: np.ndarray
    valid: np.ndarray


def read_boxes(csv_path: str | Path) -> dict[Path, Truth]:
    """Image path -> its annotated faces, from a boxes CSV (format in the module docstring)."""
    csv_path = Path(csv_path)
    images = csv_path.parent / "images"
    folder = images if images.is_dir() else csv_path.parent
    rows: dict[Path, list[tuple[float, float, float, float, bool]]] = {}
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "left", "top", "width", "height"} - set(reader.fieldnames or ())
            if missing:
                raise LabelsError(f"{csv_path} lacks the columns {', '.join(sorted(missing))}: the header must be "
                                  "file,left,top,width,height[,...,invalid,...]")
            for n, row in enumerate(reader, start=2):
                try:
                    box = tuple(float(row[k]) for k in ("left", "top", "width", "height"))
                    invalid = str(row.get("invalid") or "0").strip() not in ("0", "")
                except ValueError:
                    raise LabelsError(f"{csv_path} line {n}: left, top, width and height must be numbers") from None
                rows.setdefault(folder / row["file"], []).append((*box, not invalid))  # type: ignore[arg-type]
    except OSError as e:
        raise LabelsError(f"cannot read {csv_path}: {e.strerror}") from None
    absent = [p for p in rows if not p.is_file()]
    if absent:
        raise LabelsError(f"{len(absent)} images of {csv_path} are not in {folder}, e.g. {absent[0].name}")
    if not rows:
        raise LabelsError(f"{csv_path} lists no face")
    return {p: Truth(np.asarray([r[:4] for r in v], dtype=np.float64).reshape(-1, 4),
                     np.asarray([r[4] for r in v], dtype=bool)) for p, v in rows.items()}


# -- scoring: pure functions -------------------------------------------------------------------------------


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (n, 4: left, top, width, height) with every box of `b` (m, 4): (n, m)."""
    a, b = a[:, None, :], b[None, :, :]
    w = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(truth: np.ndarray, found: np.ndarray, min_iou: float = MIN_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching, best overlaps first: (which truth boxes were found, which detections are false)."""
    hit = np.zeros(len(truth), dtype=bool)
    used = np.zeros(len(found), dtype=bool)
    if len(truth) and len(found):
        iou = iou_matrix(truth, found)
        for i, j in zip(*np.unravel_index(np.argsort(-iou, axis=None, kind="stable"), iou.shape), strict=True):
            if iou[i, j] < min_iou:
                break
            if not hit[i] and not used[j]:
                hit[i] = used[j] = True
    return hit, ~used


@dataclass
class Score:
    """Counts of one detector over a set: faces found per width bucket, false detections, time."""

    name: str
    settings: dict[str, Any]
    found: dict[str, int] = field(default_factory=dict)
    faces: dict[str, int] = field(default_factory=dict)
    false_detections: int = 0
    false_at_least_40: int = 0
    ms_per_photo: float = 0.0

    def recall(self, bucket: str) -> float | None:
        return self.found[bucket] / self.faces[bucket] if self.faces.get(bucket) else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall"] = {k: None if (r := self.recall(k)) is None else round(r, 4) for k in self.faces}
        return d


def bucket_names() -> list[str]:
    return [f"{lo}-{hi - 1}" if hi else f">={lo}" for lo, hi in BUCKETS] + [f">={n}" for n in AT_LEAST]


def score(name: str, settings: dict[str, Any], results: list[tuple[Truth, np.ndarray]], ms: list[float]) -> Score:
    """A detector's counts from (truth, its detections as (m, 4) boxes) per image and its ms per image."""
    widths, hits, false, false_40 = [], [], 0, 0
    for truth, found in results:
        hit, wrong = match(truth.boxes, found)
        widths.append(truth.boxes[truth.valid, 2])
        hits.append(hit[truth.valid])
        false += int(wrong.sum())
        false_40 += int((wrong & (found[:, 2] >= 40)).sum()) if len(found) else 0
    w = np.concatenate(widths) if widths else np.zeros(0)
    h = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    masks = [(w >= lo) & (w < hi if hi else True) for lo, hi in BUCKETS] + [w >= n for n in AT_LEAST]
    s = Score(name, settings, false_detections=false, false_at_least_40=false_40,
              ms_per_photo=round(statistics.median(ms), 1) if ms else 0.0)
    for bucket, m in zip(bucket_names(), masks, strict=True):
        s.faces[bucket], s.found[bucket] = int(m.sum()), int((h & m).sum())
    return s


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class DetectionReport:
    boxes: str
    photos: int
    threads: int | None
    scores: list[Score]
    min_iou: float = MIN_IOU

    def to_json(self) -> str:
        d = asdict(self)
        d["scores"] = [s.to_dict() for s in self.scores]
        return json.dumps(d, indent=2)

    def table(self) -> str:
        """A Markdown table: per detector, found/faces per bucket, recall >= 20 and >= 40 px, false, ms."""
        names = bucket_names()
        head = ["detector", *[f"faces {n} px" for n in names[: len(BUCKETS)]],
                *[f"all {n} px" for n in names[len(BUCKETS):]], "false (>= 40 px)", "ms / photo"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.scores:
            cells = [s.name, *[f"{s.found[n]}/{s.faces[n]}" for n in names[: len(BUCKETS)]],
                     *[_percent(s.recall(n)) for n in names[len(BUCKETS):]],
                     f"{s.false_detections} ({s.false_at_least_40})", f"{s.ms_per_photo:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _percent(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.1f}%"


# -- the run -----------------------------------------------------------------------------------------------


def parse_config(text: str) -> tuple[str, EncoderSettings]:
    """'yunet', 'hog:upsample=2' or 'yunet:score=0.7,max_side=1024' -> (that text, EncoderSettings)."""
    name, _, rest = text.partition(":")
    keys = {"max_side": int, "upsample": int, "score": float}
    given: dict[str, Any] = {"detector": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in keys:
            raise ValueError(f"unknown detector setting {key!r} in {text!r}: use {', '.join(keys)}")
        try:
            given["detector_score" if key == "score" else key] = keys[key](value)
        except ValueError:
            raise ValueError(f"{key} in {text!r} must be a number") from None
    return text, EncoderSettings(**given)


def evaluate_detection(
    boxes_csv: str | Path,
    configs: list[tuple[str, EncoderSettings]],
    threads: int | None = 1,
    on_photo: Callable[[int, int], None] | None = None,
) -> DetectionReport:
    """Run every detector of `configs` ((name, settings) pairs) on every image of a boxes CSV; score them.

    threads: ONNX Runtime threads for YuNet (1: one core, as HOG uses). on_photo(done, total) is called
    after each image.
    """
    truth = read_boxes(boxes_csv)
    detectors: list[tuple[str, EncoderSettings, Detector]] = [
        (name, s, make_detector(s, threads=threads, device="cpu")) for name, s in configs
    ]
    results: dict[str, list[tuple[Truth, np.ndarray]]] = {name: [] for name, _, _ in detectors}
    ms: dict[str, list[float]] = {name: [] for name, _, _ in detectors}
    for done, (path, t) in enumerate(sorted(truth.items()), start=1):
        image = load_image(path)
        for name, _, detector in detectors:
            started = time.perf_counter()
            rects = detector.photo(image)
            ms[name].append((time.perf_counter() - started) * 1000)
            results[name].append((t, np.asarray([[r.left(), r.top(), r.right() - r.left(), r.bottom() - r.top()]
                                                 for r in rects], dtype=np.float64).reshape(-1, 4)))
        if on_photo:
            on_photo(done, len(truth))
    scores = [score(name, _detector_settings(s), results[name], ms[name]) for name, s, _ in detectors]
    return DetectionReport(str(boxes_csv), len(truth), threads, scores)


def _detector_settings(s: EncoderSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"detector": s.detector, "max_side": s.max_side}
    if s.detector == "yunet":
        out["score"] = s.detector_score
    else:
        out["upsample"] = s.upsample
    return out
