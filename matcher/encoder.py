"""From an image to its faces: detection, alignment and 128-d descriptors.

Photo -> (EXIF-upright RGB, see `images`) -> HOG or CNN detection on a copy scaled to at most
`max_side` pixels (boxes mapped back to the original's pixels) -> dlib's 5-point shape predictor on the
original -> `dlib.get_face_chip` (150 px, padding 0.25) -> one batch through the descriptor engine.
Everything before the chip stays in dlib: it is cheap, and a chip cut any other way changes the
descriptor. Descriptors are float32, never normalised (their norms are about 1.5).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import dlib
import numpy as np
from PIL import Image

from matcher import layout, models
from matcher.engines import DescriptorEngine, make_engine
from matcher.errors import NoFaceError

Box = tuple[int, int, int, int]  # top, right, bottom, left: face_recognition's order


@dataclass(frozen=True)
class EncoderSettings:
    """How faces are found and encoded.

    The fields in `recorded()` shape the descriptors and are stored in a gallery; `add` refuses other
    values. `engine`, `threads`, `cache_dir` (where the ONNX engine's converted model is cached; None:
    `matcher.defaults.CACHE_DIR`) and the selfie fields are per process and may differ freely.
    `selfie_mirror` and `selfie_expansion` are applied by `matcher.query` (the selfie's mirror view averaged
    in; query expansion, see `matcher.expansion`); the README's "Accuracy" section gives their measured worth.
    """

    detector: Literal["hog", "cnn"] = "hog"
    max_side: int = 1600
    upsample: int = 1
    jitters: int = 1
    engine: Literal["onnx", "dlib"] = "onnx"
    threads: int | None = None
    selfie_max_side: int = 640
    selfie_jitters: int = 1
    selfie_mirror: bool = True
    selfie_expansion: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', not {self.detector!r}")
        if self.max_side < 80 or self.selfie_max_side < 80:
            raise ValueError("detection size must be at least 80 pixels")
        if not 0 <= self.upsample <= 3:
            raise ValueError("upsample must be 0 to 3")
        if not 1 <= self.jitters <= 100 or not 1 <= self.selfie_jitters <= 100:
            raise ValueError("jitters must be 1 to 100")

    def recorded(self) -> dict[str, Any]:
        """The settings a gallery stores and checks: what makes two descriptors comparable."""
        return {
            "model": models.model_sha256(models.descriptor_model_path()),
            "landmarks": "5-point",
            **{k: getattr(self, k) for k in layout.ENCODER_FIELDS},
        }

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any], **overrides: Any) -> EncoderSettings:
        """Settings matching a gallery's record, with per-process fields from `overrides`."""
        keep = {k: recorded[k] for k in layout.ENCODER_FIELDS if k in recorded}
        return cls(**{**keep, **overrides})

    def as_dict(self) -> dict[str, Any]:
        """The fields by name; `cache_dir` only when set (where a model is cached shapes no descriptor,
        and reports of the settings need not name the default folder)."""
        fields = asdict(self)
        if fields["cache_dir"] is None:
            del fields["cache_dir"]
        return fields


@dataclass
class Face:
    """One face: its box in the original photo's pixels and its descriptor (float32[128])."""

    box: Box
    descriptor: np.ndarray = field(repr=False)

    @property
    def area(self) -> int:
        top, right, bottom, left = self.box
        return max(0, bottom - top) * max(0, right - left)


class Encoder:
    """Finds and encodes faces. Loads dlib's models once; one per process or thread."""

    def __init__(self, settings: EncoderSettings | None = None, engine: DescriptorEngine | None = None):
        self.settings = settings or EncoderSettings()
        self._hog = dlib.get_frontal_face_detector()
        self._cnn: Any = None
        self._landmarks = dlib.shape_predictor(models.landmarks_model_path(5))
        self.engine = engine or make_engine(self.settings.engine, self.settings.threads, self.settings.cache_dir)

    def faces(self, image: np.ndarray) -> list[Face]:
        """Every face in a photo, with the gallery settings (detection size, upsample, jitters)."""
        s = self.settings
        rects = self.detect(image, s.max_side, s.upsample)
        return self.describe(image, rects, s.jitters)

    def find_selfie(self, image: np.ndarray) -> dlib.rectangle:
        """The selfie's face: detection at `selfie_max_side`, retried with more upsampling for a
        small face; with several faces, the largest. Raises NoFaceError when there is none."""
        rects: list[dlib.rectangle] = []
        for upsample in (1, 2):
            rects = self.detect(image, self.settings.selfie_max_side, upsample)
            if rects:
                break
        if not rects:
            raise NoFaceError(
                "no face found in the selfie: use a well-lit photo, facing the camera, with the face "
                "filling a good part of the picture"
            )
        return max(rects, key=lambda r: r.area())

    def selfie(self, image: np.ndarray) -> Face:
        """The selfie's face alone, encoded. A search's query descriptor is `matcher.query`'s, which adds
        the mirror view; this is the face without it (the bench compares the two)."""
        return self.describe(image, [self.find_selfie(image)], self.settings.selfie_jitters)[0]

    def detect(self, image: np.ndarray, max_side: int, upsample: int) -> list[dlib.rectangle]:
        """Face rectangles in the original image's pixels, found on a copy scaled to `max_side`."""
        height, width = image.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        small = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        if self.settings.detector == "cnn":
            rects = [d.rect for d in self._cnn_detector()(small, upsample)]
        else:
            rects = list(self._hog(small, upsample))
        if scale == 1.0:
            return rects
        return [
            dlib.rectangle(
                round(r.left() / scale), round(r.top() / scale), round(r.right() / scale), round(r.bottom() / scale)
            )
            for r in rects
        ]

    def describe(self, image: np.ndarray, rects: list[dlib.rectangle], jitters: int = 1) -> list[Face]:
        """Align each rectangle with the 5-point model, cut its chip and encode all chips in one batch."""
        if not rects:
            return []
        descriptors = self.engine.describe(self.chips(image, rects), jitters)
        height, width = image.shape[:2]
        return [
            Face(trim_box(r, width, height), np.asarray(d, dtype=np.float32))
            for r, d in zip(rects, descriptors, strict=True)
        ]

    def chips(self, image: np.ndarray, rects: list[dlib.rectangle]) -> list[np.ndarray]:
        """Each rectangle aligned with the 5-point model and cut into a 150 px chip (padding 0.25)."""
        return [dlib.get_face_chip(image, self._landmarks(image, r), size=150, padding=0.25) for r in rects]

    def _cnn_detector(self) -> Any:
        if self._cnn is None:
            self._cnn = dlib.cnn_face_detection_model_v1(models.cnn_detector_path())
        return self._cnn


def default_detector() -> Literal["hog", "cnn"]:
    """CNN when dlib was built with CUDA (fast and more accurate there), else HOG."""
    return "cnn" if getattr(dlib, "DLIB_USE_CUDA", False) else "hog"


def cores() -> int:
    """Cores this process may use (respects CPU affinity and cgroup-limited containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def trim_box(r: dlib.rectangle, width: int, height: int) -> Box:
    """A detector's rectangle as a face's box: (top, right, bottom, left), clamped to the image."""
    return (max(r.top(), 0), min(r.right(), width), min(r.bottom(), height), max(r.left(), 0))
