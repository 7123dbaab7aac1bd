"""Where dlib's model files are, and the identity of the descriptor model.

A gallery records the descriptor model's identity (the sha256 of its `.dat` file) rather than the
engine that ran it, so galleries built with dlib or ONNX Runtime are interchangeable.
"""

from __future__ import annotations

import os
import warnings
from functools import cache

from matcher import layout


def _models():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation, printed on every import
        import face_recognition_models

    return face_recognition_models


def descriptor_model_path() -> str:
    """The dlib face ResNet model file shipped with face_recognition_models."""
    return str(_models().face_recognition_model_location())


def landmarks_model_path(points: int = 5) -> str:
    """The 5-point (default, what fsw aligns with) or 68-point shape predictor."""
    m = _models()
    if points == 5:
        return str(m.pose_predictor_five_point_model_location())
    if points == 68:
        return str(m.pose_predictor_model_location())
    raise ValueError(f"no {points}-point landmark model: use 5 or 68")


def cnn_detector_path() -> str:
    return str(m.cnn_face_detector_model_location()) if (m := _models()) else ""


def model_sha256(path: str) -> str:
    """The identity of a model file: its sha256, hashed once per process per (path, size, mtime)."""
    st = os.stat(path)
    return _model_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@cache
def _model_sha256(path: str, size: int, mtime_ns: int) -> str:
    return layout.file_sha256(path)
