"""Search alone, one query against 1k to 1M faces, next to the memory-bandwidth floor.

A flat search of the float32 descriptors must read every one once (512 bytes a face), so no float32 scan
can beat `bytes / bandwidth`, the floor. The bandwidth is measured in the same run with a large numpy copy,
counted as STREAM does (bytes read + bytes written, per second), on one core. `Gallery.search` scans a
whole gallery on the index rows' 8-bit codes (`matcher.coarse`: 64 bytes a face, then a float64 recheck
of the few rows near the query), split over the cores, so it reads an eighth of the floor's bytes; its
time is also given against the floor of the bytes it reads (`fsw_over_read_floor`), and the float32
scan over the cores (`fsw_float32`, what a gallery without codes does) against the float32 floor. FAISS's
own range search scans one query on one core. A gallery that fits in the CPU's caches (10k faces: 5 MB)
is read faster than that. A stage's search scans only the stage's rows, whatever the gallery's size.
"""

from __future__ import annotations

import faiss
import numpy as np

from bench.common import stats, timed, timed_together
from bench.galleries import REAL_STAGE
from matcher.coarse import CoarseScan
from matcher.gallery import Gallery
from matcher.scan import CpuScan
from matcher.search import DEFAULT_THRESHOLD, radius_for, range_search

COPY_BYTES = 1 << 30


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 5) -> dict[str, float]:
    """GB/s of a large numpy copy (read + write), median of `repeats` after a warm-up."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.zeros_like(a)  # written once so that its pages exist before the timing
    st, _ = timed(lambda: np.copyto(b, a), repeats, warmup=1)
    seconds = st["median_ms"] / 1000
    return {"bytes": nbytes, "copy": st, "gb_per_s": round(2 * nbytes / seconds / 1e9, 3)}


class FaissRange:
    """FAISS's flat range search on its own copy of the descriptors: one query, one core."""

    def __init__(self, gallery: Gallery):
        self.index = faiss.IndexFlatL2(128)
        for block in gallery.vectors.blocks:
            self.index.add(np.ascontiguousarray(block))

    def search(self, q: np.ndarray) -> np.ndarray:
        return self.index.range_search(q.reshape(1, -1), radius_for(DEFAULT_THRESHOLD))[2]


class MatmulScan:
    """numpy with precomputed squared norms: |x|^2 - 2 x.q + |q|^2 in one matrix-vector product."""

    def __init__(self, gallery: Gallery):
        self.vectors = np.asarray(gallery.vectors)
        self.norms = np.einsum("ij,ij->i", self.vectors, self.vectors)

    def search(self, q: np.ndarray) -> np.ndarray:
        d2 = self.norms - 2.0 * (self.vectors @ q) + float(q @ q)
        return np.flatnonzero(d2 < radius_for(DEFAULT_THRESHOLD))


def measure_search(gallery: Gallery, q: np.ndarray, repeats: int, bandwidth_gb_s: float) -> dict[str, object]:
    q = np.ascontiguousarray(q, dtype=np.float32)
    faiss_range, matmul = FaissRange(gallery), MatmulScan(gallery)
    one_core = CpuScan(gallery.vectors, threads=1)
    float32 = CpuScan(gallery.vectors)
    stage = REAL_STAGE if REAL_STAGE in gallery.scopes else ""
    runs = timed_together({
        "fsw": lambda: gallery.search(q, "", DEFAULT_THRESHOLD),
        "fsw_one_core": lambda: range_search(one_core, gallery.vectors, q, DEFAULT_THRESHOLD)[0],
        "fsw_float32": lambda: range_search(float32, gallery.vectors, q, DEFAULT_THRESHOLD)[0],
        "fsw_stage": lambda: gallery.search(q, stage, DEFAULT_THRESHOLD),
        "faiss": lambda: faiss_range.search(q),
        "numpy": lambda: matmul.search(q),
    }, repeats, warmup=2)
    (fsw_st, matches), (one_st, rows_one) = runs["fsw"], runs["fsw_one_core"]
    float32_st, rows_float32 = runs["fsw_float32"]
    (stage_st, stage_matches), (faiss_st, rows_faiss), (numpy_st, rows_numpy) = (
        runs["fsw_stage"], runs["faiss"], runs["numpy"])
    nbytes = gallery.vectors.nbytes
    floor_ms = nbytes / (bandwidth_gb_s * 1e9) * 1000
    codes = gallery.scanner.codes if isinstance(gallery.scanner, CoarseScan) else None
    coded = codes.rows if codes else 0
    read_bytes = (codes.nbytes if codes else 0) + (len(gallery.vectors) - coded) * 512
    read_floor_ms = read_bytes / (bandwidth_gb_s * 1e9) * 1000
    scope = gallery.scopes.get(stage)
    return {
        "faces": len(gallery.vectors),
        "bytes_scanned": int(nbytes),
        "floor_ms": round(floor_ms, 3),
        "bytes_read": int(read_bytes),
        "read_floor_ms": round(read_floor_ms, 3),
        "codes": coded,
        "threads": getattr(gallery.scanner, "threads", None),
        "fsw": fsw_st,
        "fsw_float32": float32_st,
        "fsw_one_core": one_st,
        "fsw_stage": stage_st,
        "stage": {"name": stage, "faces": int((scope[:, 1] - scope[:, 0]).sum()) if scope is not None else None},
        "faiss_range": faiss_st,
        "numpy_matmul": numpy_st,
        "fsw_over_floor": round(fsw_st["median_ms"] / floor_ms, 3) if floor_ms else None,
        "fsw_over_read_floor": round(fsw_st["median_ms"] / read_floor_ms, 3) if read_floor_ms else None,
        "fsw_float32_over_floor": round(float32_st["median_ms"] / floor_ms, 3) if floor_ms else None,
        "faces_found": {"faiss": int(len(rows_faiss)), "fsw_one_core": int(len(rows_one)),
                        "fsw_float32": int(len(rows_float32)),
                        "numpy": int(len(rows_numpy)), "fsw_photos": len(matches),
                        "fsw_stage_photos": len(stage_matches)},
    }


__all__ = ["copy_bandwidth", "measure_search", "stats"]
