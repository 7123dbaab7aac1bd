"""dlib's CNN (MMOD) face detector: 2 to 9 s a photo on a CPU, fast where dlib was built with CUDA.

Its boxes are HOG-sized (dlib trained both for its 5-point predictor), so it shares HOG's passes.
"""

from __future__ import annotations

from typing import Any

import dlib
import numpy as np

from matcher import models
from matcher.detectors.hog import HogDetector


class CnnDetector(HogDetector):
    """dlib's CNN detector, with HOG's passes (scaled to `max_side`, `upsample` upsamplings)."""

    name = "cnn"

    def __init__(self, max_side: int = 1600, upsample: int = 1, selfie_max_side: int = 640):
        super().__init__(max_side, upsample, selfie_max_side)
        self._cnn: Any = None

    def _find(self, small: np.ndarray, upsample: int) -> list[dlib.rectangle]:
        if self._cnn is None:  # loaded on first use: 0.7 MB of weights a HOG-only process never needs
            self._cnn = dlib.cnn_face_detection_model_v1(models.cnn_detector_path())
        return [d.rect for d in self._cnn(small, upsample)]


def has_cuda() -> bool:
    """Whether this dlib was built with CUDA (the only place the CNN detector is fast)."""
    return bool(getattr(dlib, "DLIB_USE_CUDA", False))
