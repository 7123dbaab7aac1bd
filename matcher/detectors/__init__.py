"""Face detectors: "where are the faces in this image?", answered in the original image's pixels.

One module per engine, all behind the `Detector` protocol:
    yunet   YuNet, a small CNN (ONNX, shipped in `models/`), with ONNX Runtime: the default
    hog     dlib's HOG detector: the detector of the first galleries, which keep using it
    cnn     dlib's CNN detector: seconds a photo on a CPU, fast where dlib was built with CUDA

Every engine answers with `dlib.rectangle`s shaped like HOG's boxes (square, brow to chin), because the
next step, dlib's 5-point shape predictor, was trained on HOG's boxes (see `yunet.hog_like`). A gallery
records its detector and settings (`EncoderSettings.recorded()`); selfies are searched with the same.
`make_detector` builds the engine an `EncoderSettings` names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import dlib
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matcher.encoder import EncoderSettings

ENGINES = ("yunet", "hog", "cnn")
DEFAULT = "yunet"  # measured: docs/accuracy.md, "Face detection"


class Detector(Protocol):
    name: str

    def photo(self, image: np.ndarray) -> list[dlib.rectangle]:
        """Every face in a gallery photo (RGB uint8), in its pixels."""
        ...

    def selfie(self, image: np.ndarray) -> list[dlib.rectangle]:
        """The faces in a selfie; the caller takes the largest. Empty when there is none."""
        ...

    def detect(self, image: np.ndarray, max_side: int, upsample: int = 1) -> list[dlib.rectangle]:
        """One pass on a copy scaled to at most `max_side` (`upsample`: HOG and CNN only)."""
        ...


def make_detector(settings: EncoderSettings, threads: int | None = None, device: str = "auto") -> Detector:
    """The detector `settings.detector` names, with its settings. `threads` and `device` (for engines
    that run with ONNX Runtime) as for the descriptor engine."""
    if settings.detector == "yunet":
        from matcher.detectors.yunet import YuNetDetector

        return YuNetDetector(settings.max_side, settings.selfie_max_side, settings.detector_score,
                             threads=threads, device=device)
    if settings.detector == "cnn":
        from matcher.detectors.cnn import CnnDetector

        return CnnDetector(settings.max_side, settings.upsample, settings.selfie_max_side)
    if settings.detector == "hog":
        from matcher.detectors.hog import HogDetector

        return HogDetector(settings.max_side, settings.upsample, settings.selfie_max_side)
    raise ValueError(f"unknown detector {settings.detector!r}: use one of {', '.join(ENGINES)}")


def default_max_side(detector: str) -> int:
    """The detection size a detector's galleries get when none is given (each module says why)."""
    if detector == "yunet":
        from matcher.detectors.yunet import DEFAULT_MAX_SIDE

        return DEFAULT_MAX_SIDE
    from matcher.detectors.hog import DEFAULT_MAX_SIDE as HOG_MAX_SIDE

    return HOG_MAX_SIDE


def recorded(settings: EncoderSettings) -> dict[str, Any]:
    """What a detector adds to a gallery's recorded settings beyond its name and detection size."""
    if settings.detector == "yunet":
        from matcher.detectors import yunet

        return yunet.recorded(settings.detector_score)
    return {}


def scaled(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """A copy of `image` scaled down to at most `max_side` pixels on its long side, and the scale used
    (the image itself and 1.0 when it is small enough). Bilinear, as every engine is measured with."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), scale


def on_scaled(image: np.ndarray, max_side: int, find: Callable[[np.ndarray], list[dlib.rectangle]]
              ) -> list[dlib.rectangle]:
    """`find` run on a copy scaled to `max_side`, its rectangles mapped back to the original's pixels."""
    small, scale = scaled(image, max_side)
    rects = find(small)
    if scale == 1.0:
        return rects
    return [
        dlib.rectangle(round(r.left() / scale), round(r.top() / scale), round(r.right() / scale),
                       round(r.bottom() / scale))
        for r in rects
    ]
