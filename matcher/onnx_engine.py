"""dlib's face descriptor ResNet run with ONNX Runtime: the same descriptors as dlib, much faster.

The graph comes from :mod:`matcher.onnx_convert` (converted once from the installed ``.dat`` file
and cached on disk).  It takes uint8 RGB chips (N, 150, 150, 3) from ``dlib.get_face_chip`` and
returns float32 descriptors (N, 128) that match dlib's ``compute_face_descriptor`` to about 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from matcher import onnx_convert
from matcher.defaults import ONNX_MAX_BATCH
from matcher.onnx_session import make_session, session_device

__all__ = ["OnnxEngine"]


class OnnxEngine:
    """Face descriptors with ONNX Runtime on the CPU or, where onnxruntime has it, CUDA.

    ``threads`` sets ONNX Runtime's intra-op thread count (None: one per core); ``device`` is
    ``"cpu"``, ``"cuda"`` or ``"auto"`` (see `matcher.onnx_session`: CUDA when it starts, else CPU).  On CUDA,
    TF32 is disabled: it would move descriptors by up to 3e-4.  ``cache_dir`` is where the converted
    model is cached (None: ``matcher.defaults.CACHE_DIR``).
    """

    name = "onnx"
    max_batch = ONNX_MAX_BATCH  # chips per ONNX Runtime call; larger batches are split

    def __init__(self, threads: int | None = None, device: str = "auto", cache_dir: str | None = None) -> None:
        # the bytes that were checked against the hash recorded at conversion are the bytes loaded
        self.model_path, model = onnx_convert.converted_model_bytes(cache_dir=cache_dir)
        self._session = make_session(model, threads, device, {"use_tf32": "0"})
        self._device = session_device(self._session)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._chip_shape = tuple(int(d) for d in inp.shape[1:])
        self._dims = int(self._session.get_outputs()[0].shape[1])

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: the provider that actually runs the network."""
        return self._device

    def describe(self, chips: Sequence[np.ndarray], jitters: int = 1) -> np.ndarray:
        """float32 (n, 128) descriptors of n RGB uint8 chips of 150x150 (n may be 0).

        With ``jitters > 1`` each chip's descriptor is the mean over ``jitters`` randomly jittered
        copies (``dlib.jitter_image``), as dlib's ``compute_face_descriptor(chip, num_jitters)``.
        """
        if jitters < 1:
            jitters = 1  # dlib treats 0 and 1 alike: no jitter
        batch = self._stack(chips)
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, self._dims), dtype=np.float32)
        if jitters == 1:
            return self._run(batch)
        import dlib

        copies = np.stack(
            [np.asarray(j, dtype=np.uint8) for chip in batch for j in dlib.jitter_image(chip, jitters)]
        )
        out = self._run(copies).reshape(n, jitters, self._dims)
        return out.mean(axis=1, dtype=np.float32)

    def _stack(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        if isinstance(chips, np.ndarray) and chips.ndim == 4:
            batch = chips
        else:
            if len(chips) == 0:
                return np.zeros((0, *self._chip_shape), dtype=np.uint8)
            for i, chip in enumerate(chips):
                if not isinstance(chip, np.ndarray) or chip.shape != self._chip_shape:
                    shape = getattr(chip, "shape", type(chip).__name__)
                    raise ValueError(f"chip {i} has shape {shape}, expected {self._chip_shape} (RGB)")
            batch = np.stack(chips)
        if batch.shape[1:] != self._chip_shape:
            raise ValueError(f"chips have shape {batch.shape[1:]}, expected {self._chip_shape} (RGB)")
        if batch.dtype != np.uint8:
            raise ValueError(f"chips must be uint8, not {batch.dtype}")
        return np.ascontiguousarray(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        parts = [
            self._session.run(None, {self._input_name: batch[i : i + self.max_batch]})[0]
            for i in range(0, batch.shape[0], self.max_batch)
        ]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxEngine(device={self._device!r}, model={self.model_path.name!r})"
