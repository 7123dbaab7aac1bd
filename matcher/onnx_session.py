"""ONNX Runtime sessions on CUDA where it runs, else on the CPU: the one place that picks the provider.

Both networks fsw runs with ONNX Runtime get their sessions here, so they fall back alike: the
descriptor network (`matcher.onnx_engine`) and the YuNet face detector (`matcher.detectors.yunet`).

device 'auto': CUDA when onnxruntime offers its CUDA provider (onnxruntime-gpu) and a session starts
there, else the CPU; 'cuda': CUDA or an error that says how to get it; 'cpu': the CPU. `is_cuda_oom`
tells a GPU out-of-memory error, which a caller may retry on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

_OOM_MARKERS = (
    "out of memory",  # CUDA's own "CUDA out of memory" / cudaErrorMemoryAllocation text
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "failed to allocate memory",  # ONNX Runtime's BFC arena
)

Provider = str | tuple[str, dict[str, str]]
SessionFactory = Callable[..., Any]  # ort.InferenceSession's signature: (model, sess_options=, providers=)


def make_session(
    model: str | bytes,
    threads: int | None = None,
    device: str = "auto",
    cuda_options: dict[str, str] | None = None,
    *,
    available: list[str] | None = None,
    create: SessionFactory = ort.InferenceSession,
) -> Any:
    """An ONNX Runtime session for `model` (a path or the model's bytes) on `device`.

    threads: intra-op threads (None: one per core). cuda_options: the CUDA provider's options.
    `available` (the providers onnxruntime offers) and `create` (the session class) are for tests,
    which simulate a GPU that fails on a machine without one.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    available = ort.get_available_providers() if available is None else available
    if device == "cuda" and CUDA not in available:
        raise RuntimeError(
            "device='cuda' but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use device='cpu'"
        )
    providers: list[Provider] = []
    if device in ("auto", "cuda") and CUDA in available:
        providers.append((CUDA, dict(cuda_options or {})))
    providers.append(CPU)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    # Idle intra-op threads otherwise spin after each run, holding the cores that the steps after it need
    # (detection, the gallery scan's threads): measured on 2 cores, a job took 50 -> 39 ms at 1k faces and
    # 113 -> 78 ms at 1M with spinning off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no warnings about providers falling back

    try:
        session = create(model, sess_options=options, providers=providers)
    except Exception:
        if device != "auto" or len(providers) == 1:
            raise
        # 'auto': onnxruntime-gpu without a usable GPU or CUDA libraries; run on the CPU
        session = create(model, sess_options=options, providers=[CPU])
    if device == "cuda" and session_device(session) != "cuda":
        raise RuntimeError("device='cuda' but ONNX Runtime could not start its CUDA provider")
    return session


def session_device(session: Any) -> str:
    """'cuda' or 'cpu': the provider that actually runs a session's network."""
    return "cuda" if CUDA in session.get_providers() else "cpu"


def is_cuda_oom(error: BaseException) -> bool:
    """Whether an error is the GPU running out of memory (and worth retrying on the CPU)."""
    if isinstance(error, MemoryError):
        return False  # host memory: the CPU would fare no better
    text = f"{type(error).__name__}: {error}".lower()
    return any(m in text for m in _OOM_MARKERS) and ("cuda" in text or "gpu" in text or "cublas" in text)
