"""dlib's HOG face detector: the detector of the first galleries, which keep using it.

It scans an 80 px window (40 px with one upsampling) over an image pyramid: 0.3-0.6 s a 1600 px photo with
one upsampling, and faces smaller than the window are not found. Measured on event photos it finds 42% of
the faces 20 px or wider (docs/accuracy.md, "Face detection"); YuNet is the default now.
"""

from __future__ import annotations

import dlib
import numpy as np

from matcher.detectors import on_scaled

# A HOG gallery's photos are scaled to at most 1600 px: set for HOG's cost (its time grows with the pixels,
# four times over with one upsampling). Galleries record it.
DEFAULT_MAX_SIDE = 1600


class HogDetector:
    """dlib's HOG detector on a copy of the image scaled to `max_side`, with `upsample` upsamplings."""

    name = "hog"

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, upsample: int = 1, selfie_max_side: int = 640):
        self.max_side = max_side
        self.upsample = upsample
        self.selfie_max_side = selfie_max_side
        self._hog = dlib.get_frontal_face_detector()

    def photo(self, image: np.ndarray) -> list[dlib.rectangle]:
        return self.detect(image, self.max_side, self.upsample)

    def selfie(self, image: np.ndarray) -> list[dlib.rectangle]:
        """At `selfie_max_side`, retried with a second upsampling when a small face was missed."""
        rects: list[dlib.rectangle] = []
        for upsample in (1, 2):
            rects = self.detect(image, self.selfie_max_side, upsample)
            if rects:
                break
        return rects

    def detect(self, image: np.ndarray, max_side: int, upsample: int = 1) -> list[dlib.rectangle]:
        return on_scaled(image, max_side, lambda small: self._find(small, upsample))

    def _find(self, small: np.ndarray, upsample: int) -> list[dlib.rectangle]:
        return list(self._hog(small, upsample))
