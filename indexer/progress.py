"""The progress of a long build or add: a tqdm bar on a terminal, one line every few seconds in a log.

On a terminal: tqdm's bar with photos done, rate, elapsed time and ETA, faces found (and photos skipped)
after it. In a log (the stream is not a terminal), a redrawn bar would be a smear of carriage returns, so
the same figures, in tqdm's words, are written as one line every `PROGRESS_LOG_S` seconds and at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

from indexer.defaults import PROGRESS_LOG_S, PROGRESS_TTY_S
from indexer.pipeline import Progress


class ProgressBar:
    """An `on_progress` callback for `index_photos`; call `close()` when the run ends."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float | None = None):
        self.stream = stream
        self.tty = _is_terminal(stream)
        self.every_s = every_s if every_s is not None else (PROGRESS_TTY_S if self.tty else PROGRESS_LOG_S)
        self._bar: tqdm | None = None
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        if self.tty:
            self._draw(p)
            return
        now = time.monotonic()
        if now - self._last < self.every_s and p.done < p.total:
            return
        self._last = now
        self.stream.write(render(p) + "\n")
        self.stream.flush()

    def _draw(self, p: Progress) -> None:
        if self._bar is None:
            # photos found already indexed are counted before the first call: start the bar there, so that
            # its rate and ETA are those of the photos encoded in this run
            self._bar = tqdm(total=p.total, initial=p.done, desc="photos", unit="photo", file=self.stream,
                             postfix=_counts(p), mininterval=self.every_s, dynamic_ncols=True)
        self._bar.set_postfix_str(_counts(p), refresh=False)
        self._bar.update(p.done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def render(p: Progress) -> str:
    """One line: 'photos:  53% 10/19 [00:04<00:03,  2.38photo/s, faces 12]'."""
    return tqdm.format_meter(p.done, p.total, p.elapsed, ncols=0, prefix="photos", unit="photo", postfix=_counts(p))


def _is_terminal(stream: TextIO) -> bool:
    """A terminal with a width. A pseudo-terminal of no size (some CI runners) gets the log's lines: tqdm
    would draw nothing there."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):
        return False


def _counts(p: Progress) -> str:
    workers = f", {p.workers} fsw-worker{'s' if p.workers > 1 else ''}" if p.workers else ""  # a fleet build
    return f"faces {p.faces}" + (f", {p.skipped} skipped" if p.skipped else "") + workers
