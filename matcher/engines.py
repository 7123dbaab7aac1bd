"""Descriptor engines: the step from aligned 150x150 face chips to 128-d descriptors.

Two implementations of one network (dlib's face ResNet, from the same `.dat` file): dlib's own
`face_recognition_model_v1`, and the same graph converted to ONNX and run with ONNX Runtime
(`matcher.onnx_engine`), which gives the same numbers many times faster.
"""

from __future__ import annotations

from typing import Protocol

import dlib
import numpy as np

from matcher import models


class DescriptorEngine(Protocol):
    name: str

    def describe(self, chips: list[np.ndarray], jitters: int = 1) -> np.ndarray:
        """float32 (n, 128) descriptors of n RGB uint8 chips of 150x150."""
        ...


class DlibEngine:
    """dlib's own descriptor network (`dlib-bin`: no BLAS, about 70-90 ms a face)."""

    name = "dlib"

    def __init__(self) -> None:
        self._net = dlib.face_recognition_model_v1(models.descriptor_model_path())

    def describe(self, chips: list[np.ndarray], jitters: int = 1) -> np.ndarray:
        if not chips:
            return np.zeros((0, 128), dtype=np.float32)
        # dlib treats 0 and 1 alike (no jitter); above 1 it averages randomly jittered copies
        out = self._net.compute_face_descriptor(chips, jitters if jitters > 1 else 0)
        return np.asarray([np.asarray(d) for d in out], dtype=np.float32)


def make_engine(name: str = "onnx", threads: int | None = None, cache_dir: str | None = None) -> DescriptorEngine:
    """The engine called `name` ('onnx' or 'dlib'); `threads` bounds ONNX Runtime's thread pool, and
    `cache_dir` is where its converted model is cached (None: `matcher.defaults.CACHE_DIR`)."""
    if name == "dlib":
        return DlibEngine()
    if name == "onnx":
        from matcher.onnx_engine import OnnxEngine

        return OnnxEngine(threads=threads, cache_dir=cache_dir)
    raise ValueError(f"unknown encoder engine {name!r}: use 'onnx' or 'dlib'")
