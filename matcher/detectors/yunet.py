"""YuNet, a small CNN face detector (ONNX, 320 KB, shipped in `models/`), run with ONNX Runtime: the default.

Engine: ONNX Runtime rather than OpenCV's `cv2.FaceDetectorYN`. ONNX Runtime already runs fsw's descriptor
network (no 60 MB OpenCV wheel to add), runs this model on CUDA where onnxruntime-gpu is installed (PyPI's
OpenCV wheels have no CUDA), and was faster: 35 against 60 ms a 1024 px event photo on one core (YuNet_s,
OpenCV 5.0.0), with the same boxes (all 17 event photos: identical but one box that OpenCV's integer NMS kept).
The decoding below is the one OpenCV's FaceDetectorYN does (opencv modules/objdetect/src/face_detect.cpp):
BGR 0-255 input padded to a multiple of 32; per stride 8, 16, 32 and grid cell, score = sqrt(cls * obj),
centre = (cell + offset) * stride, size = exp(log-size) * stride; then NMS at IoU 0.3.

Model: YuNet_n with a dynamic input shape (`models/SOURCES.md`), checked against its sha256 when loaded.
Measured on the event set (docs/accuracy.md, "Face detection"), the "n" variant at full size finds 95.6% of
the faces 40 px or wider and 91.1% of those 20 px or wider, against 93.3% and 88.3% for the smaller "s" (the file
OpenCV documents), at 49 against 33 ms a photo.

Passes. A gallery photo gets a pass on the image scaled to at most `max_side` (small faces: YuNet needs
about 20 px at its input) and, when the photo is larger than 640 px, a pass on a copy at 640 px (close-ups:
at full size YuNet cuts faces wider than about 500 px into partial boxes, measured on the dev faces);
the two are merged by overlap (`merge`). A selfie gets the 640 px pass (every dev selfie's face was found
there), and a pass at `max_side` only when that finds nothing.

Boxes go to dlib's 5-point shape predictor, trained on HOG's boxes, remapped to HOG's shape (`hog_like`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import dlib
import numpy as np

from matcher.detectors import scaled
from matcher.errors import ModelError
from matcher.onnx_session import SessionFactory, is_cuda_oom, make_session, session_device

MODEL_PATH = Path(__file__).resolve().parent / "models" / "yunet_n_dynamic.onnx"
MODEL_SHA256 = "104ee26c71d5c270ce79a6b3dced91c91013260d29a6bf18f9296c5b8c4c2b12"

# The long side a gallery photo is scaled to, at most, for the small-face pass. YuNet finds 85-90% of faces
# 20-30 px wide at its input and fewer below (measured: docs/accuracy.md), and costs 60-90 ms a megapixel on
# one core; at 3072 px a 6000x4000 camera photo keeps a 40 px face at 20 px, for about 0.6 s.
DEFAULT_MAX_SIDE = 3072
# The close-up pass, and a selfie's: YuNet's training size, where faces up to the whole frame are found.
CLOSE_UP_SIDE = 640
# A detection's score (sqrt(class * objectness)) must reach this: OpenCV's default for this model. Lower
# scores add faces 20 px and smaller, and false ones (docs/accuracy.md).
DEFAULT_SCORE = 0.6
# Boxes of one pass overlapping by IoU above this are one face (OpenCV's default for this model).
NMS_IOU = 0.3
# Boxes of different passes are one face when the intersection covers this share of the smaller box: a
# partial box from the full-size pass lies inside the close-up pass's whole face, at a low IoU.
MERGE_OVERLAP = 0.5
# YuNet's box -> HOG's square: centre moved right by DX and down by DY box heights, side K * sqrt(w * h).
# Fitted (medians) on the 40 faces of the dev gallery photos (tests/data/faces) that both HOG (1600 px,
# upsample 1) and YuNet (these passes) found: DY 0.058 (quartiles 0.042-0.083), K 0.941 (0.881-0.979),
# DX 0.000. With it, descriptors sit 0.045 (median) / 0.115 (p95) from HOG's for the same face, about what
# moving HOG's own box by 10% of its width does (0.046 / 0.094). See docs/accuracy.md.
HOG_REMAP = (0.0, 0.058, 0.941)
# Grid strides of the model's three output levels, and the input's padding multiple.
_STRIDES = (8, 16, 32)
_PAD = 32
# ONNX Runtime's CUDA provider picks convolution kernels per input shape: the heuristic choice, not an
# exhaustive search, since photo sizes vary (unverified on a GPU: no run on one yet).
_CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def recorded(score: float) -> dict[str, Any]:
    """What a YuNet gallery records beyond the detector's name: its model, score and box remap."""
    return {"detector_model": MODEL_SHA256, "detector_score": score, "box_remap": list(HOG_REMAP)}


class YuNetDetector:
    """YuNet with ONNX Runtime: a gallery photo's two passes, a selfie's pass, boxes remapped to HOG's shape.

    threads: ONNX Runtime's intra-op threads (None: one per core). device: 'auto' (CUDA where onnxruntime
    has it, else the CPU), 'cpu' or 'cuda'. On CUDA, a call that runs out of GPU memory is run again on the
    CPU (counted in `fallbacks`), as the worker's descriptor engine does.
    """

    name = "yunet"

    def __init__(
        self,
        max_side: int = DEFAULT_MAX_SIDE,
        selfie_max_side: int = CLOSE_UP_SIDE,
        score: float = DEFAULT_SCORE,
        *,
        threads: int | None = None,
        device: str = "auto",
        model_path: Path = MODEL_PATH,
        session_factory: SessionFactory = make_session,
    ):
        self.max_side = max_side
        self.selfie_max_side = selfie_max_side
        self.score = score
        self.fallbacks = 0  # calls run again on the CPU after CUDA ran out of memory
        self._model = load_model(model_path)
        self._threads = threads
        self._make = session_factory
        self._session = session_factory(self._model, threads, device, _CUDA_OPTIONS)
        self._cpu: Any = None

    @property
    def device(self) -> str:
        """'cuda' or 'cpu': where the network runs."""
        return session_device(self._session)

    def photo(self, image: np.ndarray) -> list[dlib.rectangle]:
        passes = [self.boxes(image, self.max_side)]
        if max(image.shape[:2]) > CLOSE_UP_SIDE:
            passes.append(self.boxes(image, CLOSE_UP_SIDE))
        return [hog_like(b) for b in merge(passes)]

    def selfie(self, image: np.ndarray) -> list[dlib.rectangle]:
        found = self.boxes(image, self.selfie_max_side)
        if not len(found) and max(image.shape[:2]) > self.selfie_max_side:
            found = self.boxes(image, self.max_side)  # a small face in a large selfie
        return [hog_like(b) for b in found]

    def detect(self, image: np.ndarray, max_side: int, upsample: int = 1) -> list[dlib.rectangle]:
        """One pass at `max_side` (`upsample` is HOG's and ignored), remapped to HOG's shape."""
        return [hog_like(b) for b in self.boxes(image, max_side)]

    def boxes(self, image: np.ndarray, max_side: int) -> np.ndarray:
        """YuNet's own detections on a copy scaled to at most `max_side`, in the original's pixels:
        float32 (n, 15) rows of x, y, width, height, five landmarks (x, y) and the score."""
        small, scale = scaled(image, max_side)
        found = self._decode(self._run(_blob(small)), small.shape[1])
        found[:, :14] /= scale
        return found

    def _run(self, blob: np.ndarray) -> list[np.ndarray]:
        try:
            return self._session.run(None, {"input": blob})
        except Exception as e:
            if self.device != "cuda" or not is_cuda_oom(e):
                raise
            self.fallbacks += 1
            if self._cpu is None:
                self._cpu = self._make(self._model, self._threads, "cpu")
            return self._cpu.run(None, {"input": blob})

    def _decode(self, outputs: list[np.ndarray], width: int) -> np.ndarray:
        # outputs: cls_8, cls_16, cls_32, obj_8, obj_16, obj_32, bbox_8, ..., kps_32 (the model's order)
        found = []
        for i, stride in enumerate(_STRIDES):
            cols = -(-width // _PAD) * _PAD // stride  # grid cells a row of the padded input
            cls, obj, box, kps = (outputs[i + 3 * k][0] for k in range(4))
            score = np.sqrt(np.clip(cls[:, 0], 0, 1) * np.clip(obj[:, 0], 0, 1))
            keep = np.flatnonzero(score >= self.score)
            if not keep.size:
                continue
            cell = np.stack([keep % cols, keep // cols], axis=1).astype(np.float32)
            size = np.exp(box[keep, 2:4]) * stride
            corner = (cell + box[keep, 0:2]) * stride - size / 2
            points = (kps[keep].reshape(-1, 5, 2) + cell[:, None, :]) * stride
            found.append(np.concatenate([corner, size, points.reshape(-1, 10), score[keep, None]], axis=1))
        if not found:
            return np.zeros((0, 15), dtype=np.float32)
        rows = np.concatenate(found).astype(np.float32)
        return rows[_nms(rows, NMS_IOU, _iou)]


def load_model(path: Path = MODEL_PATH) -> bytes:
    """The model's bytes, checked against the sha256 this fsw was measured with."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelError(f"the YuNet face detector model {path} cannot be read ({e.strerror}): "
                         "reinstall fsw, which ships it") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise ModelError(f"the YuNet face detector model {path} has sha256 {digest}, not {MODEL_SHA256}: the "
                         "file was altered or damaged; reinstall fsw, which ships it (see its SOURCES.md)")
    return data


def merge(passes: list[np.ndarray]) -> np.ndarray:
    """Detections of several passes as one set: by score, a box mostly inside a kept box (intersection
    at least MERGE_OVERLAP of the smaller) is the same face."""
    rows = np.concatenate(passes) if passes else np.zeros((0, 15), dtype=np.float32)
    if len(passes) < 2:
        return rows
    return rows[_nms(rows, MERGE_OVERLAP, _overlap_of_smaller)]


def hog_like(row: np.ndarray) -> dlib.rectangle:
    """YuNet's box (x, y, w, h, ...) as the square HOG would draw round the same face (`HOG_REMAP`)."""
    x, y, w, h = (float(v) for v in row[:4])
    dx, dy, k = HOG_REMAP
    cx, cy, half = x + w / 2 + dx * h, y + h / 2 + dy * h, k * np.sqrt(max(w * h, 0.0)) / 2
    return dlib.rectangle(round(cx - half), round(cy - half), round(cx + half), round(cy + half))


def _blob(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> BGR float32 (1, 3, H, W), zero-padded to multiples of 32 (as OpenCV does)."""
    height, width = rgb.shape[:2]
    padded = (1, 3, -(-height // _PAD) * _PAD, -(-width // _PAD) * _PAD)
    blob = np.zeros(padded, dtype=np.float32)
    blob[0, :, :height, :width] = rgb[:, :, ::-1].transpose(2, 0, 1)
    return blob


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    inter = _intersection(box, others)
    return inter / (box[2] * box[3] + others[:, 2] * others[:, 3] - inter)


def _overlap_of_smaller(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    return _intersection(box, others) / np.minimum(box[2] * box[3], others[:, 2] * others[:, 3])


def _intersection(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    w = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3]) - np.maximum(box[1], others[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _nms(rows: np.ndarray, limit: float, overlap: Any) -> np.ndarray:
    """Indices of the rows kept by greedy non-maximum suppression: best score first, each dropping the
    rows it overlaps by more than `limit`."""
    order = np.argsort(-rows[:, 14], kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[overlap(rows[best], rows[rest]) <= limit]
    return np.asarray(keep, dtype=np.int64)
