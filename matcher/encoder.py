"""From an image to its faces: detection, alignment and 128-d descriptors.

Photo -> (EXIF-upright RGB, see `images`) -> face detection by a `matcher.detectors` engine (YuNet by
default, HOG for the first galleries; boxes in the original's pixels, shaped like HOG's) -> faces
narrower than `min_face` left out (counted) -> dlib's 5-point shape predictor on the original ->
`dlib.get_face_chip` (150 px, padding 0.25) -> one batch through the descriptor engine. Everything
between the box and the chip stays in dlib: it is cheap, and a chip cut any other way (from YuNet's own
landmarks, say) changes the descriptor. Descriptors are float32, never normalised (norms about 1.5).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import dlib
import numpy as np

from matcher import detectors, layout, models
from matcher.detectors import Detector, make_detector
from matcher.engines import DescriptorEngine, make_engine
from matcher.errors import NoFaceError

Box = tuple[int, int, int, int]  # top, right, bottom, left: face_recognition's order

# Faces narrower than this (pixels of the photo) are not indexed. Measured (docs/accuracy.md, "Face
# detection"): dev gallery photos scaled so that their faces are 60, 40, 30 and 20 px wide, searched with
# the full-size selfies, gave no wrong photo at the 0.5 threshold at any of these sizes (found: 43, 40, 30
# and 5 of 48); smaller faces were not measured, and are kept out.
MIN_FACE = 20


@dataclass(frozen=True)
class EncoderSettings:
    """How faces are found and encoded.

    The fields in `recorded()` shape the descriptors and are stored in a gallery; `add` refuses other
    values. `engine`, `threads`, `cache_dir` (where the ONNX engine's converted model is cached; None:
    `matcher.defaults.CACHE_DIR`) and the selfie fields are per process and may differ freely.
    `selfie_mirror` and `selfie_expansion` are applied by `matcher.query` (the selfie's mirror view averaged
    in; query expansion, see `matcher.expansion`); the README's "Accuracy" section gives their measured worth.

    Detection: `detector` is an engine of `matcher.detectors`; `max_side` (None: the detector's default,
    3072 for YuNet and 1600 for HOG and CNN) bounds a gallery photo's detection size; `upsample` is HOG's
    and CNN's, `detector_score` YuNet's. Faces narrower than `min_face` pixels are not indexed (counted in
    the build summary): measured on the dev faces, docs/accuracy.md. Galleries built before these fields
    existed record no `min_face` and mean 0, and every recorded detector means itself, so they keep working.
    """

    detector: Literal["yunet", "hog", "cnn"] = detectors.DEFAULT  # type: ignore[assignment]
    max_side: int = None  # type: ignore[assignment]  # resolved per detector in __post_init__
    upsample: int = 1
    jitters: int = 1
    engine: Literal["onnx", "dlib"] = "onnx"
    threads: int | None = None
    selfie_max_side: int = 640
    selfie_jitters: int = 1
    selfie_mirror: bool = True
    selfie_expansion: bool = True
    cache_dir: str | None = None
    min_face: int = MIN_FACE
    detector_score: float = 0.6

    def __post_init__(self) -> None:
        if self.detector not in detectors.ENGINES:
            raise ValueError(f"detector must be one of {', '.join(detectors.ENGINES)}, not {self.detector!r}")
        if self.max_side is None:
            object.__setattr__(self, "max_side", detectors.default_max_side(self.detector))
        if self.max_side < 80 or self.selfie_max_side < 80:
            raise ValueError("detection size must be at least 80 pixels")
        if not 0 <= self.upsample <= 3:
            raise ValueError("upsample must be 0 to 3")
        if not 1 <= self.jitters <= 100 or not 1 <= self.selfie_jitters <= 100:
            raise ValueError("jitters must be 1 to 100")
        if not 0 <= self.min_face <= 10_000:
            raise ValueError("min_face must be 0 (every face) to 10000 pixels")
        if not 0 < self.detector_score < 1:
            raise ValueError("detector_score must lie between 0 and 1")

    def recorded(self) -> dict[str, Any]:
        """The settings a gallery stores and checks: what makes two descriptors comparable, and which faces
        are indexed. The detector adds its own (YuNet: its model's sha256, score and box remap);
        `min_face` only when above 0, as galleries from before it record nothing and indexed every face."""
        return {
            "model": models.model_sha256(models.descriptor_model_path()),
            "landmarks": "5-point",
            **{k: getattr(self, k) for k in layout.ENCODER_FIELDS},
            **detectors.recorded(self),
            **({"min_face": self.min_face} if self.min_face else {}),
        }

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any], **overrides: Any) -> EncoderSettings:
        """Settings matching a gallery's record, with per-process fields from `overrides`. A record
        without a detector or `min_face` is an older gallery's: HOG, every face indexed."""
        keep = {k: recorded[k] for k in (*layout.ENCODER_FIELDS, "detector_score") if k in recorded}
        legacy = {"detector": "hog", "min_face": recorded.get("min_face", 0)}
        return cls(**{**legacy, **keep, **overrides})

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
    """Finds and encodes faces. Loads the models once; one per process or thread.

    `detector` and `engine` default to the ones `settings` name (injectable, for tests and the worker)."""

    def __init__(self, settings: EncoderSettings | None = None, engine: DescriptorEngine | None = None,
                 detector: Detector | None = None):
        self.settings = settings or EncoderSettings()
        self._landmarks = dlib.shape_predictor(models.landmarks_model_path(5))
        self.engine = engine or make_engine(self.settings.engine, self.settings.threads, self.settings.cache_dir)
        self.detector = detector or make_detector(self.settings, self.settings.threads)

    def faces(self, image: np.ndarray) -> list[Face]:
        """Every face in a photo at least `min_face` pixels wide, with the gallery settings."""
        return self.photo_faces(image)[0]

    def photo_faces(self, image: np.ndarray, scale: float = 1.0) -> tuple[list[Face], int]:
        """A gallery photo's faces at least `min_face` pixels wide, encoded, and how many narrower ones
        were found and left out (a build counts them).

        scale: the image's pixels per original pixel, for a photo decoded smaller than it is
        (`matcher.images.load_scaled`): widths and boxes are the original photo's."""
        rects = self.detector.photo(image)
        keep = [r for r in rects if (r.right() - r.left()) / scale >= self.settings.min_face]
        faces = self.describe(image, keep, self.settings.jitters)
        if scale != 1.0:
            faces = [replace(f, box=tuple(round(v / scale) for v in f.box)) for f in faces]  # type: ignore[arg-type]
        return faces, len(rects) - len(keep)

    def find_selfie(self, image: np.ndarray) -> dlib.rectangle:
        """The selfie's face: the detector's selfie passes (HOG: at `selfie_max_side`, retried with more
        upsampling; YuNet: at 640 px, then at `max_side`); with several faces, the largest. Raises
        NoFaceError when there is none."""
        rects = self.detector.selfie(image)
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
        """Face rectangles in the original image's pixels, found by one pass of the detector on a copy
        scaled to `max_side` (`upsample`: HOG's and CNN's)."""
        return self.detector.detect(image, max_side, upsample)

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


def default_detector() -> str:
    """The detector new galleries get: YuNet (on CUDA where ONNX Runtime has it), chosen by measurement
    (docs/accuracy.md, "Face detection")."""
    return detectors.DEFAULT


def cores() -> int:
    """Cores this process may use (respects CPU affinity and cgroup-limited containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def trim_box(r: dlib.rectangle, width: int, height: int) -> Box:
    """A detector's rectangle as a face's box: (top, right, bottom, left), clamped to the image."""
    return (max(r.top(), 0), min(r.right(), width), min(r.bottom(), height), max(r.left(), 0))
