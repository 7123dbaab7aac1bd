"""What every benchmark section shares: the run's configuration, timing statistics, the face set, caches.

Every figure is the median of several runs after a warm-up, reported with its spread (p25-p75 and
min-max), in milliseconds unless a name says otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.labels import Label, read_labels
from testkit.photos import FACES

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FSW_BENCH_CACHE", "/tmp/fsw-bench-cache"))
QUERY = "queries/q04.jpg"  # Obama, 626x1200: three photos of him in the dev gallery


@dataclass(frozen=True)
class Config:
    """Sizes and repeats of one run: the full run, or the smoke run (`--quick`)."""

    quick: bool
    engines: tuple[str, ...] = ("onnx", "dlib")
    gallery_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    job_repeats: int = 7
    search_repeats: int = 15
    old_way_photos: tuple[int, ...] = (10, 100)
    old_way_repeats: tuple[int, ...] = (3, 1)  # per size in old_way_photos
    worker_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    tree_photos: int = 95
    add_photos: int = 10
    add_bases: tuple[int, ...] = (100, 1_000)
    add_repeats: int = 3
    build_repeats: int = 3  # of the dev-gallery builds that compare the engines
    # (max side, upsample): upsample 2 only at 640 px; above, it costs most of a second a photo and on photos
    # of at most 1600 px finds nothing that upsample 1 misses
    grid: tuple[tuple[int, int], ...] = ((640, 0), (640, 1), (640, 2), (800, 0), (800, 1), (1280, 0), (1280, 1),
                                         (1600, 0), (1600, 1))
    descriptor_repeats: int = 3
    descriptor_warmup: int = 1
    dev_photos: int = 19  # of the dev gallery, for the engine comparison and the detection grid
    pool_jobs: int | None = None  # encoder processes for the dev-gallery builds and `add` (None: every core)
    memory_sizes: tuple[int, ...] = (0, 1_000, 100_000, 1_000_000)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls, engines: tuple[str, ...] = ("onnx", "dlib")) -> Config:
        return cls(quick=False, engines=engines)

    @classmethod
    def smoke(cls, engines: tuple[str, ...] = ("onnx", "dlib")) -> Config:
        return cls(
            quick=True,
            engines=engines,
            gallery_sizes=(1_000, 10_000),
            job_repeats=2,
            search_repeats=3,
            old_way_photos=(1,),
            old_way_repeats=(1,),
            worker_sizes=(1_000,),
            tree_photos=4,
            add_photos=2,
            add_bases=(100,),
            add_repeats=1,
            build_repeats=1,
            grid=((640, 0), (640, 1)),
            descriptor_repeats=1,
            descriptor_warmup=0,
            dev_photos=4,
            pool_jobs=1,
            memory_sizes=(0, 1_000),
        )


def stats(seconds: list[float]) -> dict[str, float | int]:
    """Median and spread of timings, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p25_ms": round(float(np.percentile(ms, 25)), 3),
        "p75_ms": round(float(np.percentile(ms, 75)), 3),
        "min_ms": round(float(ms.min()), 3),
        "max_ms": round(float(ms.max()), 3),
        "n": len(ms),
    }


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[dict[str, float | int], Any]:
    """Call `fn` `warmup` times unmeasured, then `repeats` times; the timings' stats and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return stats(times), result


def timed_together(fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int = 1, rounds: int = 3,
                   pause_s: float = 0.2) -> dict[Any, tuple[dict[str, float | int], Any]]:
    """`timed` for several methods, in `rounds` interleaved blocks (a a a, b b b, a a a, b b b, ...), so that
    a change in the machine's other load weighs on each method alike and their ratios hold.

    `pause_s` between blocks: BLAS and ONNX Runtime threads spin for a while after a call, and would
    otherwise slow the next method's first runs (measured: a FAISS scan right after a numpy matmul of the
    same size took twice as long). Each block begins with `warmup` runs that are not timed, so that every
    timed run follows a run of its own method, as a worker's job follows the previous job: a method's first
    run after another's pays for what the other evicted (measured: a whole-gallery search of 1M faces'
    codes took 3.3 ms back to back and 6.7 ms right after numpy's 512 MB scan, in the same process).
    """
    times, results = _alternate(fns, repeats, warmup, rounds, pause_s)
    return {name: (stats(times[name]), results.get(name)) for name in fns}


def timed_pairs(first: Callable[[], Any], second: Callable[[], Any], rounds: int, warmup: int = 1,
                pause_s: float = 0.2) -> dict[str, Any]:
    """Two methods timed in alternation, one run each a round (`timed_together`'s blocks of one run), and
    the median of the rounds' ratios second / first: a paired measurement, so that the machine's drift
    between rounds, which a shared machine has, weighs on both sides of each ratio alike."""
    times, _ = _alternate({"first": first, "second": second}, rounds, warmup, rounds, pause_s)
    ratios = np.asarray(times["second"]) / np.asarray(times["first"])
    return {"first": stats(times["first"]), "second": stats(times["second"]),
            "ratio": round(float(np.median(ratios)), 3),
            "ratio_p25_p75": [round(float(np.percentile(ratios, q)), 3) for q in (25, 75)]}


def _alternate(fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int, rounds: int,
               pause_s: float) -> tuple[dict[Any, list[float]], dict[Any, Any]]:
    """Each method's `repeats` timings (seconds, in order) in `rounds` interleaved blocks, each block after
    `pause_s` idle and `warmup` untimed runs; and each method's last result."""
    results: dict[Any, Any] = {}
    times: dict[Any, list[float]] = {name: [] for name in fns}
    repeats = max(1, repeats)
    rounds = max(1, min(rounds, repeats))
    per_round = -(-repeats // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause_s)
            for _ in range(warmup):
                results[name] = fn()
            for _ in range(min(per_round, repeats - len(times[name]))):
                t = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t)
    return times, results


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def labels() -> list[Label]:
    """The dev set's labels (`indexer.labels`, the one parser), in file order."""
    if not (FACES / "labels.csv").is_file():
        sys.exit(f"labelled faces not found at {FACES}: set FSW_FACES to the folder with labels.csv")
    return read_labels(FACES / "labels.csv")


def gallery_photos() -> list[Label]:
    return [x for x in labels() if x.split == "gallery"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
