"""A selfie's search: the one path that `fsw-index search` and every worker job take.

decode (EXIF-upright RGB, size-checked) -> the selfie's face -> its query descriptor -> gallery search.

The query descriptor, with the default settings:
- the selfie's face is found and encoded as `Encoder.selfie` does (with `selfie_jitters` jittered copies
  averaged when above 1);
- `selfie_mirror`: the same face in the left-right mirrored selfie (same box, mirrored; landmarks fitted
  again) is encoded too, and the two descriptors are averaged. A deterministic test-time augmentation:
  the same selfie always gives the same descriptor, unlike random jitter;
- `selfie_expansion`: the descriptor is refined with the gallery faces it matched with high
  confidence (`matcher.expansion`), and the search runs with the refined descriptor.
Every result has `similarity = 1 - |query descriptor - face descriptor| > threshold`.
"""

from __future__ import annotations

import os

import dlib
import numpy as np

from matcher.defaults import DEFAULT_THRESHOLD, SELFIE_MAX_PIXELS
from matcher.encoder import Encoder
from matcher.expansion import expand_query
from matcher.gallery import Gallery
from matcher.images import load_image
from matcher.search import Match


def selfie_descriptor(encoder: Encoder, selfie: bytes | str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """The descriptor of the selfie's face. Raises ImageError or NoFaceError with a reason."""
    image = selfie if isinstance(selfie, np.ndarray) else load_image(selfie, max_pixels=SELFIE_MAX_PIXELS)
    face = encoder.selfie(image)
    if not encoder.settings.selfie_mirror:
        return face.descriptor
    top, right, bottom, left = face.box
    width = image.shape[1]
    mirrored = dlib.rectangle(width - 1 - right, top, width - 1 - left, bottom)
    mirror = encoder.describe(np.ascontiguousarray(image[:, ::-1]), [mirrored], encoder.settings.selfie_jitters)[0]
    return ((face.descriptor.astype(np.float64) + mirror.descriptor) / 2).astype(np.float32)


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

    The stage and `exclude` filter the answer; the expansion looks at the whole gallery, so filtering the
    answer afterwards (as the worker does with excluded photos) gives the same result.
    """
    if expand:
        descriptor = expand_query(gallery, descriptor, threshold).descriptor
    return gallery.search(descriptor, stage, threshold, limit, exclude)


def search_selfie(
    gallery: Gallery,
    encoder: Encoder,
    selfie: bytes | str | os.PathLike[str] | np.ndarray,
    stage: str | None = "",
    threshold: float = DEFAULT_THRESHOLD,
    limit: int | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[Match]:
    """Photos of the selfie's person, best first, one entry per photo."""
    gallery.check_stage(stage)  # an unknown stage fails before the costly encode
    descriptor = selfie_descriptor(encoder, selfie)
    return search_descriptor(gallery, descriptor, stage, threshold, limit, exclude, encoder.settings.selfie_expansion)


__all__ = ["search_descriptor", "search_selfie", "selfie_descriptor"]
