"""Search alone, one query against 1k to 1M faces, next to the memory-bandwidth floor.

A flat search must read every descriptor once (512 bytes a face), so no exact method can beat
`bytes / bandwidth`. The bandwidth is measured in the same run with a large numpy copy, counted as
STREAM does (bytes read + bytes written, per second); the copy runs on one core, as FAISS's search for
one query does. A gallery that fits in the CPU's caches (10k faces: 5 MB) is read faster than that.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from bench.common import stats, timed, timed_together
from matcher.encoder import cores
from matcher.gallery import Gallery
from matcher.search import DEFAULT_THRESHOLD, radius_for

COPY_BYTES = 1 << 30


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 5) -> dict[str, float]:
    """GB/s of a large numpy copy (read + write), median of `repeats` after a warm-up."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.zeros_like(a)  # written once so that its pages exist before the timing
    st, _ = timed(lambda: np.copyto(b, a), repeats, warmup=1)
    seconds = st["median_ms"] / 1000
    return {"bytes": nbytes, "copy": st, "gb_per_s": round(2 * nbytes / seconds / 1e9, 3)}


def faiss_range(gallery: Gallery, q: np.ndarray):  # noqa: ANN201
    lims, d, rows = gallery.index.range_search(q.reshape(1, -1), radius_for(DEFAULT_THRESHOLD))
    return rows


class SplitRange:
    """FAISS range search over the rows split into one slice per core, one thread each (FAISS releases
    the GIL): what `Gallery.search` would gain by using both cores for one query."""

    def __init__(self, vectors: np.ndarray, parts: int):
        bounds = np.linspace(0, len(vectors), parts + 1).astype(int)
        self.parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            index = faiss.IndexFlatL2(vectors.shape[1])
            index.add(vectors[lo:hi])
            self.parts.append((int(lo), index))
        self.pool = ThreadPoolExecutor(parts)

    def search(self, q: np.ndarray) -> np.ndarray:
        def one(part: tuple[int, faiss.IndexFlatL2]) -> np.ndarray:
            lo, index = part
            return index.range_search(q.reshape(1, -1), radius_for(DEFAULT_THRESHOLD))[2] + lo

        return np.concatenate(list(self.pool.map(one, self.parts)))

    def close(self) -> None:
        self.pool.shutdown()


class MatmulScan:
    """numpy with precomputed squared norms: |x|^2 - 2 x.q + |q|^2 in one matrix-vector product."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.norms = np.einsum("ij,ij->i", vectors, vectors)

    def search(self, q: np.ndarray) -> np.ndarray:
        d2 = self.norms - 2.0 * (self.vectors @ q) + float(q @ q)
        return np.flatnonzero(d2 < radius_for(DEFAULT_THRESHOLD))


def measure_search(gallery: Gallery, q: np.ndarray, repeats: int, bandwidth_gb_s: float) -> dict[str, object]:
    q = np.ascontiguousarray(q, dtype=np.float32)
    scan = MatmulScan(gallery.vectors)
    split = SplitRange(gallery.vectors, cores())
    runs = timed_together({
        "fsw": lambda: gallery.search(q, "", DEFAULT_THRESHOLD),
        "faiss": lambda: faiss_range(gallery, q),
        "split": lambda: split.search(q),
        "numpy": lambda: scan.search(q),
    }, repeats, warmup=2)
    split.close()
    (fsw_st, matches), (faiss_st, rows_faiss) = runs["fsw"], runs["faiss"]
    (split_st, rows_split), (numpy_st, rows_numpy) = runs["split"], runs["numpy"]
    nbytes = gallery.index.ntotal * gallery.index.d * 4
    floor_ms = nbytes / (bandwidth_gb_s * 1e9) * 1000
    return {
        "faces": int(gallery.index.ntotal),
        "bytes_scanned": int(nbytes),
        "floor_ms": round(floor_ms, 3),
        "faiss_range": faiss_st,
        "faiss_split_threads": split_st,
        "numpy_matmul": numpy_st,
        "fsw": fsw_st,
        "fsw_over_floor": round(fsw_st["median_ms"] / floor_ms, 3) if floor_ms else None,
        "faces_found": {"faiss": int(len(rows_faiss)), "faiss_split": int(len(rows_split)),
                        "numpy": int(len(rows_numpy)), "fsw_photos": len(matches)},
    }


__all__ = ["copy_bandwidth", "measure_search", "stats"]
