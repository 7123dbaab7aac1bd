"""A selfie's search: the one path that `fsw-index search` and every worker job take.

    the selfie's bytes (or file) -> `load_selfie`: EXIF-upright RGB, at most SELFIE_MAX_PIXELS (refused
        from the header) and at least MIN_SELFIE_SIDE on each side                   -> "decoded"
    -> the selfie's face (`Encoder.find_selfie`: the largest)                        -> "face_found"
    -> its query descriptor (the face and its mirror view, one engine call)          -> "encoded"
    -> query expansion and the gallery search (`search_descriptor`)                  -> "searched"

`search_selfie` runs it all; `on_progress(stage)` is called with each stage's name as it is passed (the
names are the keys of the job contract's `schemas.PROGRESS`), from the thread the search runs in.

The query descriptor, with the default settings:
- the selfie's face is found at `selfie_max_side` and encoded with `selfie_jitters`;
- `selfie_mirror`: the same face in the left-right mirrored selfie (same box, mirrored; landmarks fitted
  again; only the face's surroundings are mirrored, not the whole selfie) is encoded too, in the same
  engine call, and the two descriptors are averaged. A deterministic test-time augmentation: the same
  selfie always gives the same descriptor, unlike random jitter;
- `selfie_expansion`: the descriptor is refined with the faces of the job's stage (the whole gallery
  without one) it matched with high confidence (`matcher.expansion`), and the search runs with the
  refined descriptor.
Every result has `similarity = 1 - |query descriptor - face descriptor| > threshold`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import dlib
import numpy as np

from matcher.defaults import DEFAULT_THRESHOLD, MIN_SELFIE_SIDE, SELFIE_MAX_PIXELS
from matcher.encoder import Encoder, trim_box
from matcher.errors import ImageError
from matcher.expansion import expand_from
from matcher.gallery import Gallery
from matcher.images import load_scaled
from matcher.search import Match, check_threshold

Stage = Literal["decoded", "face_found", "encoded", "searched"]
STAGES: tuple[Stage, ...] = ("decoded", "face_found", "encoded", "searched")
OnProgress = Callable[[Stage], None]
# A selfie: its file, its bytes, an image already decoded, or a function that gives its bytes (called once
# the stage is known to exist, so a job's base64 is decoded only for a search that can run).
Selfie = bytes | str | os.PathLike[str] | np.ndarray
SelfieSource = Selfie | Callable[[], bytes]


def load_selfie(selfie: Selfie, max_side: int | None = None) -> np.ndarray:
    """The selfie as an upright RGB array, within the selfie's limits; ImageError with the reason if not.

    max_side: decode no larger than needed for a detection pass at that size (`load_scaled`): the face's
    chip is 150 px, and a 40 MP selfie decoded whole held 120 MB per copy. None: full size."""
    if isinstance(selfie, np.ndarray):
        image, scale = selfie, 1.0
    else:
        image, scale = load_scaled(selfie, SELFIE_MAX_PIXELS, max_side)
    height, width = (round(side / scale) for side in image.shape[:2])  # the selfie's own size
    if min(height, width) < MIN_SELFIE_SIDE:
        raise ImageError(
            f"image too small: {width}x{height} pixels: send a selfie at least {MIN_SELFIE_SIDE} pixels "
            "on each side, with the face filling a good part of it"
        )
    return image


def selfie_descriptor(encoder: Encoder, selfie: Selfie, on_progress: OnProgress | None = None) -> np.ndarray:
    """The query descriptor of the selfie's face (float32[128]). Raises ImageError or NoFaceError."""
    report = on_progress or _quiet
    settings = encoder.settings
    image = load_selfie(selfie, max(settings.max_side, settings.selfie_max_side))  # its largest detection pass
    report("decoded")
    box = encoder.find_selfie(image)
    report("face_found")
    chips = encoder.chips(image, [box])
    if settings.selfie_mirror:
        chips += encoder.chips(*_mirrored_face(image, box))
    # one engine call for both views: a selfie's encoding runs, or falls back to the CPU, as one
    descriptors = np.asarray(encoder.engine.describe(chips, encoder.settings.selfie_jitters), dtype=np.float32)
    if len(descriptors) == 1:
        descriptor = descriptors[0]
    else:
        descriptor = ((descriptors[0].astype(np.float64) + descriptors[1]) / 2).astype(np.float32)
    report("encoded")
    return descriptor


def _mirrored_face(image: np.ndarray, box: dlib.rectangle) -> tuple[np.ndarray, list[dlib.rectangle]]:
    """The face's surroundings mirrored left-right, and the face's box in them: what the mirror view's chip
    is cut from. Only the surroundings are copied, not the whole selfie; they reach one face size beyond
    the box on each side, more than the chip (the face and a quarter of its size around it, turned with
    the face) and the landmark model read, so the chip is the one the whole mirrored selfie gives."""
    height, width = image.shape[:2]
    top, right, bottom, left = trim_box(box, width, height)
    margin = max(bottom - top, right - left)
    y0, y1 = max(0, top - margin), min(height, bottom + margin)
    x0, x1 = max(0, left - margin), min(width, right + margin)
    region = np.ascontiguousarray(image[y0:y1, x0:x1][:, ::-1])
    last = x1 - x0 - 1
    return region, [dlib.rectangle(last - (right - x0), top - y0, last - (left - x0), bottom - y0)]


def search_descriptor(
    gallery: Gallery,
    descriptor: np.ndarray,
    stage: str | None = "",
    threshold: float = DEFAULT_THRESHOLD,
    limit: int | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
    expand: bool = True,
) -> list[Match]:
    """Photos of the person whose selfie gave `descriptor`, best first; query expansion when `expand`.

    Only the stage's rows are scanned, by the expansion too (its evidence is the stage's photos); `exclude`
    filters the answer, so filtering it afterwards (as the worker does with excluded photos) gives the
    same result. The expansion's scan is the search of `descriptor` itself, so a query that is not
    expanded costs one scan, and an expanded one two.
    """
    if not expand:
        return gallery.search(descriptor, stage, threshold, limit, exclude)
    threshold, stage = check_threshold(threshold), gallery.check_stage(stage)
    hits, distances = gallery.scan(descriptor, threshold, stage)
    expansion = expand_from(gallery, descriptor, hits, distances, threshold)
    if not expansion.expanded:
        return gallery.matches(hits, distances, limit, exclude)
    return gallery.search(expansion.descriptor, stage, threshold, limit, exclude)


def search_selfie(
    gallery: Gallery,
    encoder: Encoder,
    selfie: SelfieSource,
    stage: str | None = "",
    threshold: float = DEFAULT_THRESHOLD,
    limit: int | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
    on_progress: OnProgress | None = None,
) -> list[Match]:
    """Photos of the selfie's person, best first, one entry per photo.

    Raises StageError (before anything costly), ImageError or NoFaceError with a reason a person can act
    on; `on_progress` hears each stage of the module's sequence as it is passed.
    """
    gallery.check_stage(stage)
    image = selfie() if callable(selfie) else selfie
    descriptor = selfie_descriptor(encoder, image, on_progress)
    matches = search_descriptor(
        gallery, descriptor, stage, threshold, limit, exclude, encoder.settings.selfie_expansion
    )
    (on_progress or _quiet)("searched")
    return matches


def _quiet(stage: Stage) -> None:
    """The progress callback when nobody listens."""


__all__ = [
    "STAGES",
    "OnProgress",
    "Selfie",
    "SelfieSource",
    "Stage",
    "load_selfie",
    "search_descriptor",
    "search_selfie",
    "selfie_descriptor",
]
