"""The 8-bit codes of a gallery's indexed descriptors: a whole-gallery scan that reads a quarter of the bytes.

A whole-gallery scan at 1M faces reads 512 MB of float32 rows, 12-15 ms at the dev machine's memory
speed, and an expanded query scans twice, where a whole job at 1k faces takes 20-37 ms (docs/performance.md).
The codes file holds each descriptor in 128 bytes, FAISS's 8-bit scalar quantizer with one range for every
dimension (`QT_8bit_uniform`, the min and max over the rows). The writer measures `error`, the largest
distance between a descriptor and its decoded code, over every row it encodes. A row within distance `r`
of a query is then within `r + error` of its code (triangle inequality), so the rows whose codes lie
within `r + error` hold every answer; `matcher.search.range_search` rechecks them against the float32 rows
in float64, so the answers are exactly those of the float32 scan, with a few more rows rechecked.

`index-v<N>-sq8.faiss` is written with the index file and recorded in the manifest (`coarse`: file, sha256,
error; docs/gallery-format.md). Readers map it read-only, as the index file, so the worker processes of a
machine share one copy. A file that is missing or not the one recorded is not read: the scan reads the
float32 rows instead, and a warning says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from matcher import index_file, layout
from matcher.defaults import COARSE_FIRST_K, COARSE_MAX_K, SCAN_MIN_ROWS_PER_THREAD
from matcher.scan import DIM, CpuScan, Descriptors, Ranges, knn_range_search, scan_pool, split_scope, whole

QUANTIZER = faiss.ScalarQuantizer.QT_8bit_uniform
_ENCODE_ROWS = 1 << 16  # rows encoded and checked at a time: 8 MiB of codes, 32 MiB of floats
# FAISS sums a code's squared distance in float32: relative rounding far below this, for 128 terms
_ROUNDING = 1e-5
_HEADER_BYTES = 1 << 16  # FAISS's header before the codes: the quantizer's type, its range, the counts


def file_name(version: int) -> str:
    return f"index-v{version}-sq8.faiss"


def write(folder: Path, version: int, vectors: np.ndarray) -> dict[str, Any] | None:
    """Write the codes of `vectors` (float32 (n, 128), the index file's rows) as `file_name(version)`;
    the manifest's `coarse` entry for it, or None when the rows have no spread to code (all equal)."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, DIM)
    if len(vectors) == 0 or not np.isfinite(vectors).all() or float(vectors.max() - vectors.min()) <= 0.0:
        return None
    index = faiss.IndexScalarQuantizer(DIM, QUANTIZER, faiss.METRIC_L2)
    index.train(vectors)  # the uniform quantizer's range: the min and max over every value
    error = 0.0
    for lo in range(0, len(vectors), _ENCODE_ROWS):
        block = np.ascontiguousarray(vectors[lo : lo + _ENCODE_ROWS])
        codes = index.sa_encode(block)
        decoded = index.sa_decode(codes).astype(np.float64)
        error = max(error, float(np.sqrt(((decoded - block) ** 2).sum(axis=1)).max()))
        index.add_sa_codes(codes)
    name = file_name(version)
    with layout.atomic_replace(folder / name) as tmp:
        faiss.write_index(index, str(tmp))
    return {"file": name, "sha256": layout.file_sha256(folder / name), "error": error}


def problem(folder: Path, m: layout.Manifest) -> str | None:
    """Why the codes file `m.coarse` names must not be read (one line, naming the file), or None when it is
    the one the writer recorded: checked as the index file is (`matcher.index_file`), and of the size the
    codes of `index_faces` rows take with FAISS's header (a few hundred bytes). `m.coarse` must be set."""
    assert m.coarse is not None
    name, codes = m.coarse["file"], m.index_faces * DIM

    def size(st: os.stat_result) -> str | None:
        if not codes <= st.st_size <= codes + _HEADER_BYTES:
            return f"{name}: {st.st_size} bytes, where {m.index_faces} faces' codes take {codes} and a header"
        return None

    return index_file.recorded_file_problem(folder / name, m.coarse["sha256"], "coarse sha256", size)


def read(path: Path, faces: int) -> faiss.IndexScalarQuantizer:
    """A codes file (one `problem` passed), its codes memory-mapped read-only and shared; ValueError if it
    is not the 8-bit codes of `faces` descriptors."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:  # a FAISS without mapping on this system: a private copy
        index = faiss.read_index(str(path))
    if not isinstance(index, faiss.IndexScalarQuantizer) or index.sq.qtype != QUANTIZER:
        raise ValueError(f"{path.name} is not an 8-bit scalar-quantizer index")
    if index.d != DIM or index.ntotal != faces or index.code_size != DIM:
        raise ValueError(f"{path.name} holds {index.ntotal} codes of {index.d} dimensions, not {faces} of {DIM}")
    return index


def touch(index: faiss.IndexScalarQuantizer) -> None:
    """Read one byte of every page of the mapped codes now, while a worker loads, not in its first search."""
    if index.ntotal:
        codes = faiss.rev_swig_ptr(index.codes.data(), index.ntotal * DIM)
        int(codes[::4096].sum())


class CoarseScan:
    """A `matcher.scan.Scanner`: whole-gallery scans on the codes, split over the cores; a stage's rows, and
    the rows committed after the index file, on the float32 rows (`matcher.scan.CpuScan`).

    Each thread searches its own share of the codes through a FAISS index that views them (no copy).
    """

    def __init__(self, codes: faiss.IndexScalarQuantizer, error: float, vectors: Descriptors,
                 threads: int | None = None):
        if codes.ntotal > len(vectors):
            raise ValueError(f"{codes.ntotal} codes for {len(vectors)} descriptors")
        self.codes = codes
        self.error = float(error)
        self.vectors = vectors
        self.fine = CpuScan(vectors, threads)
        self.threads = self.fine.threads
        parts = split_scope(whole(codes.ntotal), self.threads, SCAN_MIN_ROWS_PER_THREAD)
        self.parts = [(int(p[0, 0]), _view(codes, int(p[0, 0]), int(p[0, 1]))) for p in parts if len(p)]

    def candidates(self, query: np.ndarray, radius: float, scope: Ranges | None = None) -> np.ndarray:
        n, coded = len(self.vectors), self.codes.ntotal
        whole_gallery = scope is None or (len(scope) == 1 and scope[0, 0] <= 0 and scope[0, 1] >= n)
        if not whole_gallery or coded == 0:
            return self.fine.candidates(query, radius, scope)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, DIM)
        # every row within sqrt(radius) has its code within sqrt(radius) + error
        wide = (math.sqrt(max(radius, 0.0)) + self.error) ** 2 * (1 + _ROUNDING) + _ROUNDING
        found = self._coded(q, wide)
        if found is None:  # more rows near the query than k-NN searches find cheaply: scan the floats
            return self.fine.candidates(query, radius, scope)
        if coded < n:
            found.append(self.fine.candidates(q, radius, np.asarray([[coded, n]], np.int64)))
        return np.concatenate(found)

    def _coded(self, q: np.ndarray, radius: float) -> list[np.ndarray] | None:
        """Rows whose codes lie within `radius`, one array per share; None past COARSE_MAX_K in a share."""
        def share(part: tuple[int, faiss.IndexScalarQuantizer]) -> np.ndarray | None:
            lo, index = part
            rows = knn_range_search(index, q, radius, k=COARSE_FIRST_K, max_k=COARSE_MAX_K)
            return None if rows is None else rows + lo

        if len(self.parts) == 1:
            out = [share(self.parts[0])]
        else:
            pool = scan_pool(self.threads - 1)
            futures = [pool.submit(share, part) for part in self.parts[1:]]
            out = [share(self.parts[0])] + [f.result() for f in futures]
        return None if any(rows is None for rows in out) else out  # type: ignore[misc]


def _view(codes: faiss.IndexScalarQuantizer, lo: int, hi: int) -> faiss.IndexScalarQuantizer:
    """A FAISS index of codes rows [lo, hi) that reads `codes`' memory (which must outlive it)."""
    if lo == 0 and hi == codes.ntotal:
        return codes
    view = faiss.IndexScalarQuantizer(DIM, QUANTIZER, faiss.METRIC_L2)
    view.sq.trained = codes.sq.trained
    view.is_trained = True
    start = faiss.rev_swig_ptr(codes.codes.data(), codes.ntotal * DIM)[lo * DIM :]
    view.codes = faiss.MaybeOwnedVectorUInt8.create_view(faiss.swig_ptr(start), (hi - lo) * DIM, codes.codes.owner)
    view.ntotal = hi - lo
    return view

