"""The progress line of a long build: photos done, photos/s, faces found, ETA.

On a terminal it redraws one line; in a log (not a tty) it prints a line every 10 seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from indexer.pipeline import Progress


class ProgressLine:
    def __init__(self, stream: TextIO = sys.stderr, every_s: float | None = None):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and p.done < p.total:
            return
        self._last = now
        self.stream.write(("\r" if self.tty else "") + render(p) + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")


def render(p: Progress) -> str:
    rate = p.done / p.elapsed if p.elapsed > 0 else 0.0
    eta = (p.total - p.done) / rate if rate > 0 else float("nan")
    pct = 100 * p.done / p.total if p.total else 100.0
    skipped = f", {p.skipped} skipped" if p.skipped else ""
    return (
        f"photos {p.done}/{p.total} ({pct:.0f}%)  {rate:.2f} photos/s  faces {p.faces}{skipped}  "
        f"ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: no rate yet
        return "--"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
