"""A gate the descriptor engine waits at, so that a job stays in a worker's hands until a test opens it.

A test that needs a job in hand (a pause, SIGTERM with jobs running, Redis going away mid-job) closes
the gate, sends the job, and waits until the job has `entered`: it has been decoded, its face found,
and it now waits in the engine. It stays there, however fast the machine, until the test opens the
gate. No test then depends on a job being slow, and none asserts how long anything took.

The gate is a folder, so it works across processes: `gated_engines(gate)` installs it in this process
for a `with` block; a worker started by `testkit.worker_process.start_worker(..., gate=gate)` runs
`python -m testkit.gated_worker <folder> run ...`, which installs it for the process's life. Open, the
gate costs one file check per engine call.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOLD_LIMIT_S = 300.0  # a gate left closed by a failed test lets its jobs go rather than hang the worker
_POLL_S = 0.01


class Gate:
    """Open when created. `close()`, send jobs, `wait_entered(n)`, do what the test needs, `open()`."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._closed = folder / "closed"

    @property
    def is_closed(self) -> bool:
        return self._closed.exists()

    def close(self) -> None:
        """Hold every engine call from now on; the count of entered calls starts again at 0."""
        for marker in self.folder.glob("entered-*"):
            marker.unlink(missing_ok=True)
        self._closed.touch()

    def open(self) -> None:
        self._closed.unlink(missing_ok=True)

    def entered(self) -> int:
        """Engine calls held at the gate since it was closed."""
        return sum(1 for _ in self.folder.glob("entered-*"))

    def wait_entered(self, count: int = 1, timeout: float = 60.0) -> None:
        """Return once `count` engine calls wait at the gate; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.entered() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.entered()} of {count} jobs reached the closed gate within {timeout} s")
            time.sleep(_POLL_S)

    def hold(self) -> None:
        """Called before each engine call: when the gate is closed, say so and wait until it opens."""
        if not self._closed.exists():
            return
        (self.folder / f"entered-{os.getpid()}-{uuid.uuid4().hex}").touch()
        deadline = time.monotonic() + HOLD_LIMIT_S
        while self._closed.exists() and time.monotonic() < deadline:
            time.sleep(_POLL_S)


def _engine_classes() -> list[type]:
    from matcher.engines import DlibEngine
    from matcher.onnx_engine import OnnxEngine

    return [OnnxEngine, DlibEngine]


def _gated(gate: Gate, describe: Callable[..., Any]) -> Callable[..., Any]:
    def describe_after_the_gate(self: Any, chips: Any, jitters: int = 1) -> Any:
        gate.hold()
        return describe(self, chips, jitters)

    return describe_after_the_gate


@contextmanager
def gated_engines(gate: Gate) -> Iterator[Gate]:
    """Within the block, every descriptor engine in this process waits at `gate` before it encodes."""
    originals = {cls: cls.__dict__["describe"] for cls in _engine_classes()}
    try:
        for cls, describe in originals.items():
            cls.describe = _gated(gate, describe)  # type: ignore[attr-defined]
        yield gate
    finally:
        for cls, describe in originals.items():
            cls.describe = describe  # type: ignore[attr-defined]


def install(gate: Gate) -> None:
    """For the rest of this process, every descriptor engine waits at `gate` before it encodes."""
    for cls in _engine_classes():
        cls.describe = _gated(gate, cls.__dict__["describe"])  # type: ignore[attr-defined]
