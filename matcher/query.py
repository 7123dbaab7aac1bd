"""A selfie's search: the one path that `fsw-index search` and every worker job take.

decode (EXIF-upright RGB, size-checked) -> the selfie's face -> gallery search.
"""

from __future__ import annotations

import os

import numpy as np

from matcher.encoder import Encoder
from matcher.gallery import Gallery
from matcher.images import DEFAULT_MAX_PIXELS, load_image
from matcher.search import DEFAULT_THRESHOLD, Match

SELFIE_MAX_PIXELS = 40_000_000  # a phone's largest photos are about 50 MP; 40 MP at most for a selfie


def selfie_descriptor(encoder: Encoder, selfie: bytes | str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """The descriptor of the selfie's face. Raises ImageError or NoFaceError with a reason."""
    image = selfie if isinstance(selfie, np.ndarray) else load_image(selfie, max_pixels=SELFIE_MAX_PIXELS)
    return encoder.selfie(image).descriptor


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
    return gallery.search(selfie_descriptor(encoder, selfie), stage, threshold, limit, exclude)


__all__ = ["DEFAULT_MAX_PIXELS", "search_selfie", "selfie_descriptor"]
