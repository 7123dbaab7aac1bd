"""Per-job latency: a portal job's whole path, from the data-URL selfie to the JSON result.

Three ways to answer the same job:
- fsw: `matcher.query.search_selfie` on a loaded gallery (one selfie encode, one vector search);
- numpy: the same selfie descriptor (`matcher.query.selfie_descriptor`), then every precomputed
  descriptor compared by hand with `np.linalg.norm(vectors - q, axis=1)`, as a user would write it (and
  as DeepFace's `find` does), with no further refinement of the query;
- the old way: the replaced worker, which for every job scaled each photo of the stage to at most 640 px
  (long side), detected and encoded its faces with face_recognition (4 jitters, the 68-point 'large'
  model) and compared the selfie against each.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import timed
from matcher.encoder import Encoder
from matcher.gallery import Gallery
from matcher.query import search_selfie, selfie_descriptor
from matcher.search import DEFAULT_THRESHOLD, best_per_photo
from schemas import dump_result, parse_job

OLD_JITTERS = 4
OLD_MODEL = "large"
OLD_MAX_SIDE = 640  # the replaced worker shrank each photo to this long side before detection


def job_payload(image: str, uid: str = "bench@example.edu", stage: str = "") -> dict[str, object]:
    return {"image": image, "uid": uid, "stage": stage, "timestamp": int(time.time() * 1000)}


def fsw_job(gallery: Gallery, encoder: Encoder, payload: dict[str, object]) -> str:
    image = parse_job(payload).image_bytes()
    matches = search_selfie(gallery, encoder, image, str(payload["stage"]), DEFAULT_THRESHOLD)
    return json.dumps(dump_result(matches))


class NumpyScan:
    """The exhaustive comparison over the same precomputed descriptors, without an index."""

    def __init__(self, gallery: Gallery):
        self.vectors = np.array(gallery.vectors, dtype=np.float32)  # its own copy, as a user would load them
        self.gallery = gallery

    def job(self, encoder: Encoder, payload: dict[str, object]) -> str:
        q = selfie_descriptor(encoder, parse_job(payload).image_bytes())
        d = np.linalg.norm(self.vectors - q, axis=1)
        rows = np.flatnonzero(d < 1.0 - DEFAULT_THRESHOLD)
        g = self.gallery
        matches = best_per_photo(rows, d[rows].astype(np.float64), g.face_photo, g.photo_ids, g.face_boxes)
        return json.dumps(dump_result(matches))


def old_way_photo(path: Path) -> np.ndarray:
    """A photo as the replaced worker saw it: RGB, long side at most `OLD_MAX_SIDE` pixels."""
    with Image.open(path) as image:
        small = image.convert("RGB")
    small.thumbnail((OLD_MAX_SIDE, OLD_MAX_SIDE))  # keeps the aspect ratio; never enlarges
    return np.asarray(small)


def old_way_job(photos: list[Path], payload: dict[str, object],
                on_photo: Callable[[float], None] | None = None) -> tuple[str, float]:
    """The replaced worker: encode the selfie, then detect and encode every photo of the stage, each
    scaled to at most `OLD_MAX_SIDE` pixels first (the selfie as sent).

    Returns the JSON result and the seconds spent on the selfie; `on_photo` gets each photo's seconds.
    """
    import face_recognition

    t = time.perf_counter()
    selfie = face_recognition.load_image_file(io.BytesIO(parse_job(payload).image_bytes()))
    encodings = face_recognition.face_encodings(selfie, num_jitters=OLD_JITTERS, model=OLD_MODEL)
    if not encodings:
        raise ValueError("no face in the selfie")
    me = encodings[0]
    selfie_s = time.perf_counter() - t
    found = []
    for path in photos:
        t = time.perf_counter()
        image = old_way_photo(path)
        faces = face_recognition.face_encodings(image, num_jitters=OLD_JITTERS, model=OLD_MODEL)
        if faces:
            d = float(face_recognition.face_distance(faces, me).min())
            if d < 1.0 - DEFAULT_THRESHOLD:
                found.append({"id": path.name, "similarity": 1.0 - d})
        if on_photo:
            on_photo(time.perf_counter() - t)
    found.sort(key=lambda m: -m["similarity"])
    return json.dumps(found), selfie_s


def measure_old_way(photos: list[Path], payload: dict[str, object], repeats: int) -> dict[str, object]:
    """The old job over `photos`, `repeats` times after a one-photo warm-up (which loads the models)."""
    old_way_job(photos[:1], payload)
    per_photo: list[float] = []
    selfie: list[float] = []

    def run() -> str:
        result, s = old_way_job(photos, payload, per_photo.append)
        selfie.append(s)
        return result

    st, result = timed(run, repeats, warmup=0)
    return {
        "photos": len(photos),
        "latency": st,
        "selfie_ms": round(float(np.median(selfie)) * 1000, 3),
        "per_photo_ms_mean": round(float(np.mean(per_photo)) * 1000, 3),
        "matches": len(json.loads(result)),
    }
