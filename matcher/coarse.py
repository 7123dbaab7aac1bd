"""The 8-bit codes of a gallery's indexed descriptors: a whole-gallery scan that reads an eighth of the bytes.

A whole-gallery scan at 1M faces reads 512 MB of float32 rows, 12-15 ms at the dev machine's memory
speed, and an expanded query scans twice, where a whole job at 1k faces takes 20-37 ms (docs/performance.md).
The codes file holds each descriptor in `COARSE_DIMS` (64) bytes: the rows' principal components (PCA of the
rows, their `COARSE_DIMS` directions of most variance), each coded in 8 bits by FAISS's scalar quantizer with
one range for every component (`QT_8bit_uniform`, the min and max over the rows).

The scan stays exact. The projection onto orthonormal directions never lengthens a difference, so a row
within distance `r` of a query projects within `r` of the query's projection; the writer measures `error`,
the largest distance between a row's projection and its decoded code, over every row it encodes; so the
row's code lies within `r + error` of the query's projection (triangle inequality). The rows whose codes lie
within that radius hold every answer, and `matcher.search.range_search` rechecks them against the float32
rows in float64: the answers are exactly those of the float32 scan, with some more rows rechecked (the
dropped components, a few percent of the variance, let in faces that differ only there).

`index-v<N>-sq8.faiss` (a FAISS `IndexPreTransform`: the projection, then the codes) is written with the index
file and recorded in the manifest (`coarse`: file, sha256, error; docs/gallery-format.md). Readers map it
read-only, as the index file, so the worker processes of a machine share one copy. A file that is missing
or not the one recorded is not read: the scan reads the float32 rows instead, and a warning says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from matcher import index_file, layout
from matcher.defaults import COARSE_DIMS, COARSE_FIRST_K, COARSE_MAX_K, SCAN_MIN_ROWS_PER_THREAD
from matcher.scan import (
    DIM,
    CpuScan,
    Descriptors,
    Ranges,
    knn_range_search,
    on_threads,
    split_scope,
    touch_pages,
    whole,
)

QUANTIZER = faiss.ScalarQuantizer.QT_8bit_uniform
_ENCODE_ROWS = 1 << 16  # rows projected, encoded and checked at a time: 32 MiB of floats
# FAISS projects the query and sums a code's squared distance in float32: its rounding is far below this
_ROUNDING = 1e-5
_HEADER_BYTES = 1 << 17  # FAISS's bytes besides the codes: the projection (32 KiB), the range, the counts


def file_name(version: int) -> str:
    return f"index-v{version}-sq8.faiss"


@dataclass
class Codes:
    """A read codes file: the projection of a query, and the codes it is compared with."""

    file: faiss.IndexPreTransform  # owns the two below, and the mapping of the file
    projection: faiss.LinearTransform  # 128 -> COARSE_DIMS
    index: faiss.IndexScalarQuantizer  # the rows' codes

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.rows * int(self.index.code_size)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return self.projection.apply(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, DIM))

    def decoded(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the codes, decoded (float32, in the projected space)."""
        width = int(self.index.code_size)
        codes = faiss.rev_swig_ptr(self.index.codes.data(), self.rows * width)[lo * width : hi * width]
        return self.index.sa_decode(np.ascontiguousarray(codes).reshape(-1, width))


def write(folder: Path, version: int, vectors: np.ndarray) -> dict[str, Any] | None:
    """Write the codes of `vectors` (float32 (n, 128), the index file's rows) as `file_name(version)`;
    the manifest's `coarse` entry for it, or None when the rows have no spread to code (all equal) or are not
    finite."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, DIM)
    if len(vectors) == 0:
        return None
    a, b = _principal_components(vectors, COARSE_DIMS)
    projection = faiss.LinearTransform(DIM, COARSE_DIMS, True)
    faiss.copy_array_to_vector(a.ravel(), projection.A)
    faiss.copy_array_to_vector(b, projection.b)
    projection.is_trained = True
    blocks = range(0, len(vectors), _ENCODE_ROWS)
    low, high = np.inf, -np.inf
    for lo in blocks:
        y = projection.apply(np.ascontiguousarray(vectors[lo : lo + _ENCODE_ROWS]))  # as a query is projected
        if not np.isfinite(y).all():  # a row that is not finite (`fsw-index verify` reports it)
            return None
        low, high = min(low, float(y.min())), max(high, float(y.max()))
    if not high > low:
        return None
    codes = faiss.IndexScalarQuantizer(COARSE_DIMS, QUANTIZER, faiss.METRIC_L2)
    faiss.copy_array_to_vector(np.asarray([low, high - low], np.float32), codes.sq.trained)  # every value in range
    codes.is_trained = True
    error = 0.0
    for lo in blocks:
        y = projection.apply(np.ascontiguousarray(vectors[lo : lo + _ENCODE_ROWS]))
        encoded = codes.sa_encode(y)
        decoded = codes.sa_decode(encoded).astype(np.float64)
        error = max(error, float(np.sqrt(((decoded - y) ** 2).sum(axis=1)).max()))
        codes.add_sa_codes(encoded)
    index = faiss.IndexPreTransform(projection, codes)
    name = file_name(version)
    with layout.atomic_replace(folder / name) as tmp:
        faiss.write_index(index, str(tmp))
    return {"file": name, "sha256": layout.file_sha256(folder / name), "error": error}


def _principal_components(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows' `dims` directions of most variance as an orthonormal (dims, 128) float32 matrix `a`, and
    `b = -a @ mean`: `a @ x + b` is a row's centred projection. Covariance summed in float64, by blocks."""
    mean = vectors.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((DIM, DIM))
    for lo in range(0, len(vectors), _ENCODE_ROWS):
        block = vectors[lo : lo + _ENCODE_ROWS].astype(np.float64) - mean
        scatter += block.T @ block
    _, directions = np.linalg.eigh(scatter)  # ascending eigenvalues; orthonormal eigenvectors
    a = np.ascontiguousarray(directions[:, ::-1][:, :dims].T, dtype=np.float32)
    return a, (-(a.astype(np.float64) @ mean)).astype(np.float32)


def problem(folder: Path, m: layout.Manifest) -> str | None:
    """Why the codes file `m.coarse` names must not be read (one line, naming the file), or None when it is
    the one the writer recorded: checked as the index file is (`matcher.index_file`), and of the size the
    codes of `index_faces` rows take with FAISS's header (a few hundred bytes). `m.coarse` must be set."""
    assert m.coarse is not None
    name, codes = m.coarse["file"], m.index_faces * COARSE_DIMS

    def size(st: os.stat_result) -> str | None:
        if not codes <= st.st_size <= codes + _HEADER_BYTES:
            return f"{name}: {st.st_size} bytes, where {m.index_faces} faces' codes take {codes} and a header"
        return None

    return index_file.recorded_file_problem(folder / name, m.coarse["sha256"], "coarse sha256", size)


def read(path: Path, faces: int) -> Codes:
    """A codes file (one `problem` passed), its codes memory-mapped read-only and shared; ValueError if it
    is not the projected 8-bit codes of `faces` descriptors."""
    try:
        file = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:  # a FAISS without mapping on this system: a private copy
        file = faiss.read_index(str(path))
    if not isinstance(file, faiss.IndexPreTransform) or file.chain.size() != 1:
        raise ValueError(f"{path.name} is not a projection followed by codes")
    projection = faiss.downcast_VectorTransform(file.chain.at(0))
    index = faiss.downcast_index(file.index)
    if not isinstance(projection, faiss.LinearTransform) or projection.d_in != DIM:
        raise ValueError(f"{path.name} does not project {DIM}-dimensional descriptors")
    if not isinstance(index, faiss.IndexScalarQuantizer) or index.sq.qtype != QUANTIZER:
        raise ValueError(f"{path.name} does not hold 8-bit scalar-quantizer codes")
    if index.d != projection.d_out or index.code_size != index.d or index.ntotal != faces:
        raise ValueError(f"{path.name} holds {index.ntotal} codes of {index.d} components, not {faces} of "
                         f"{projection.d_out}")
    return Codes(file, projection, index)


def touch(codes: Codes) -> None:
    """Map the codes' pages now, while a worker loads, not in its first search (`matcher.scan.touch_pages`)."""
    if codes.rows:
        touch_pages(faiss.rev_swig_ptr(codes.index.codes.data(), codes.nbytes))


class CoarseScan:
    """A `matcher.scan.Scanner`: whole-gallery scans on the codes, split over the cores; a stage's rows, and
    the rows committed after the index file, on the float32 rows (`matcher.scan.CpuScan`).

    Each thread searches its own share of the codes through a FAISS index that views them (no copy).
    """

    def __init__(self, codes: Codes, error: float, vectors: Descriptors, threads: int | None = None):
        if codes.rows > len(vectors):
            raise ValueError(f"{codes.rows} codes for {len(vectors)} descriptors")
        self.codes = codes
        self.error = float(error)
        self.vectors = vectors
        self.fine = CpuScan(vectors, threads)
        self.threads = self.fine.threads
        parts = split_scope(whole(codes.rows), self.threads, SCAN_MIN_ROWS_PER_THREAD)
        self.parts = [(int(p[0, 0]), _view(codes.index, int(p[0, 0]), int(p[0, 1]))) for p in parts if len(p)]

    def candidates(self, query: np.ndarray, radius: float, scope: Ranges | None = None) -> np.ndarray:
        n, coded = len(self.vectors), self.codes.rows
        whole_gallery = scope is None or (len(scope) == 1 and scope[0, 0] <= 0 and scope[0, 1] >= n)
        if not whole_gallery or coded == 0:
            return self.fine.candidates(query, radius, scope)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, DIM)
        # every row within sqrt(radius) of q has its code within sqrt(radius) + error of q's projection
        wide = (math.sqrt(max(radius, 0.0)) + self.error) ** 2 * (1 + _ROUNDING) + _ROUNDING
        found = self._coded(self.codes.project(q), wide)
        if found is None:  # more rows near the query than k-NN searches find cheaply: scan the floats
            return self.fine.candidates(query, radius, scope)
        if coded < n:
            found.append(self.fine.candidates(q, radius, np.asarray([[coded, n]], np.int64)))
        return np.concatenate(found)

    def _coded(self, projected: np.ndarray, radius: float) -> list[np.ndarray] | None:
        """Rows whose codes lie within `radius` of the projected query, one array per share; None past
        COARSE_MAX_K in a share."""
        def share(part: tuple[int, faiss.IndexScalarQuantizer]) -> np.ndarray | None:
            lo, index = part
            rows = knn_range_search(index, projected, radius, k=COARSE_FIRST_K, max_k=COARSE_MAX_K)
            return None if rows is None else rows + lo

        out = on_threads(share, self.parts, self.threads)
        return None if any(rows is None for rows in out) else out  # type: ignore[return-value]


def _view(codes: faiss.IndexScalarQuantizer, lo: int, hi: int) -> faiss.IndexScalarQuantizer:
    """A FAISS index of codes rows [lo, hi) that reads `codes`' memory (which must outlive it)."""
    if lo == 0 and hi == codes.ntotal:
        return codes
    width = int(codes.code_size)
    view = faiss.IndexScalarQuantizer(codes.d, QUANTIZER, faiss.METRIC_L2)
    view.sq.trained = codes.sq.trained
    view.is_trained = True
    start = faiss.rev_swig_ptr(codes.codes.data(), codes.ntotal * width)[lo * width :]
    view.codes = faiss.MaybeOwnedVectorUInt8.create_view(faiss.swig_ptr(start), (hi - lo) * width, codes.codes.owner)
    view.ntotal = hi - lo
    return view
