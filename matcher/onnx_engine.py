"""dlib's face descriptor ResNet run with ONNX Runtime: the same descriptors as dlib, much faster.

The graph comes from :mod:`matcher.onnx_convert` (converted once from the installed ``.dat`` file
and cached on disk).  It takes uint8 RGB chips (N, 150, 150, 3) from ``dlib.get_face_chip`` and
returns float32 descriptors (N, 128) that match dlib's ``compute_face_descriptor`` to about 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from matcher import onnx_convert
from matcher.defaults import ONNX_MAX_BATCH

__all__ = ["OnnxEngine"]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


class OnnxEngine:
    """Face descriptors with ONNX Runtime on the CPU or, where onnxruntime has it, CUDA.

    ``threads`` sets ONNX Runtime's intra-op thread count (None: one per core); ``device`` is
    ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when onnxruntime offers it, else CPU).  On CUDA,
    TF32 is disabled: it would move descriptors by up to 3e-4.  ``cache_dir`` is where the converted
    model is cached (None: ``matcher.defaults.CACHE_DIR``).
    """

    name = "onnx"
    max_batch = ONNX_MAX_BATCH  # chips per ONNX Runtime call; larger batches are split

    def __init__(self, threads: int | None = None, device: str = "auto", cache_dir: str | None = None) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        available = ort.get_available_providers()
        if device == "cuda" and _CUDA not in available:
            raise RuntimeError(
                "device='cuda' but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use device='cpu'"
            )
        providers: list[str | tuple[str, dict[str, str]]] = []
        if device in ("auto", "cuda") and _CUDA in available:
            providers.append((_CUDA, {"use_tf32": "0"}))
        providers.append(_CPU)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no warnings about providers falling back

        self.model_path = onnx_convert.converted_model_path(cache_dir=cache_dir)
        model = str(self.model_path)
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception:
            if device != "auto" or len(providers) == 1:
                raise
            # 'auto': onnxruntime-gpu without a usable GPU or CUDA libraries; run on the CPU
            self._session = ort.InferenceSession(model, sess_options=options, providers=[_CPU])
        self._device = "cuda" if _CUDA in self._session.get_providers() else "cpu"
        if device == "cuda" and self._device != "cuda":
            raise RuntimeError("device='cuda' but ONNX Runtime could not start its CUDA provider")
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
