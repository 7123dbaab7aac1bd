"""FAISS on a GPU: the range search emulated by k-NN (checked here with CPU indexes), the GPU scan's CPU
fallback, and, where FAISS has GPU support and a CUDA device exists (`make gpu-check`), the GPU itself."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from matcher import gpu
from matcher.gallery import Gallery
from matcher.gpu import GpuScan, has_gpu
from matcher.scan import CpuScan, Descriptors, knn_range_search
from matcher.search import exhaustive_search, radius_for, range_search
from matcher.writer import GalleryWriter, PendingPhoto

SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}
ON_GPU = pytest.mark.skipif(not has_gpu(0), reason="needs FAISS with GPU support and a CUDA device (make gpu-check)")


def _data(n: int, near: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`n` descriptor-like rows (norm 1.5), `near` of them scattered within distance 0.1-0.7 of the query."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 128))
    x = 1.5 * x / np.linalg.norm(x, axis=1, keepdims=True)
    q = x[0].copy()
    step = rng.normal(size=(near, 128))
    x[1 : near + 1] = q + rng.uniform(0.1, 0.7, (near, 1)) * step / np.linalg.norm(step, axis=1, keepdims=True)
    return x.astype(np.float32), q.astype(np.float32)


def _exact(x: np.ndarray, q: np.ndarray, radius: float) -> list[int]:
    d2 = ((x.astype(np.float64) - q) ** 2).sum(axis=1)
    return np.flatnonzero(d2 < radius).tolist()


def test_knn_range_search_equals_the_range_search_with_many_more_matches_than_k():
    x, q = _data(5000, 400)
    index = faiss.IndexFlatL2(128)
    index.add(x)
    for t in (0.3, 0.45, 0.5, 0.6):
        radius = radius_for(t)
        want = _exact(x, q, radius)
        lims, _, ref = index.range_search(q.reshape(1, -1), radius)
        assert sorted(ref.tolist()) == want
        for k in (1, 16, 1024):
            got = knn_range_search(index, q, radius, k=k)
            assert sorted(got.tolist()) == want, (t, k)
    assert len(_exact(x, q, radius_for(0.3))) > 300  # far more than the first k


def test_knn_range_search_sees_only_the_rows_a_selector_lets_through():
    x, q = _data(3000, 300)
    index = faiss.IndexFlatL2(128)
    index.add(x)
    radius = radius_for(0.45)
    params = faiss.SearchParameters(sel=faiss.IDSelectorRange(100, 2200))
    got = knn_range_search(index, q, radius, k=8, rows=2100, params=params)
    assert sorted(got.tolist()) == [r for r in _exact(x, q, radius) if 100 <= r < 2200]


def test_knn_range_search_gives_up_past_max_k():
    x, q = _data(3000, 300)
    index = faiss.IndexFlatL2(128)
    index.add(x)
    assert knn_range_search(index, q, radius_for(0.3), k=16, max_k=64) is None
    few = _exact(x, q, radius_for(0.8))
    assert 16 < len(few) < 64 and sorted(knn_range_search(index, q, radius_for(0.8), k=16, max_k=64).tolist()) == few


def test_knn_range_search_of_an_empty_index_is_empty():
    assert knn_range_search(faiss.IndexFlatL2(128), np.zeros(128, np.float32), 1.0).tolist() == []


def _cpu_index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(128)
    index.add(x)
    return index


def test_the_gpu_scan_answers_as_the_cpu_scan(monkeypatch):
    """GpuScan's logic with a CPU index in the device's place: same rows and distances as the CPU path."""
    monkeypatch.setattr(gpu, "GPU_MIN_ROWS", 0)
    x, q = _data(4000, 600)
    vectors = Descriptors([x[:2500], x[2500:]])
    scanner = GpuScan(vectors, 0, index=_cpu_index(x))
    for t in (0.3, 0.5, 0.6):  # at 0.3, more matches than GPU_FIRST_K
        rows, d = range_search(scanner, vectors, q, t)
        ref_rows, ref_d = range_search(CpuScan(vectors), vectors, q, t)
        assert sorted(zip(rows.tolist(), d.tolist(), strict=True)) == sorted(
            zip(ref_rows.tolist(), ref_d.tolist(), strict=True))
        assert sorted(rows.tolist()) == sorted(exhaustive_search(x, q, t)[0].tolist())
    scope = np.asarray([[10, 900]])  # a stage: scanned on the CPU
    assert sorted(range_search(scanner, vectors, q, 0.5, scope)[0].tolist()) == [
        r for r in exhaustive_search(x, q, 0.5)[0].tolist() if 10 <= r < 900]
    assert scanner.fallbacks == 0


def test_a_gpu_past_max_k_searches_on_the_cpu(monkeypatch):
    monkeypatch.setattr(gpu, "GPU_MIN_ROWS", 0)
    monkeypatch.setattr(gpu, "GPU_MAX_K", 32)
    x, q = _data(2000, 300)
    vectors = Descriptors([x])
    scanner = GpuScan(vectors, 0, index=_cpu_index(x))
    rows, _ = range_search(scanner, vectors, q, 0.3)
    assert sorted(rows.tolist()) == sorted(exhaustive_search(x, q, 0.3)[0].tolist()) and len(rows) > 32
    assert scanner.fallbacks == 0  # not an error: just a search the GPU cannot do


class _BrokenDevice:
    """An index whose device fails, as a GPU that ran out of memory or was lost."""

    ntotal = 2000

    def search(self, *args, **kwargs):
        raise RuntimeError("Error in void faiss::gpu::allocMemorySpaceV: CUDA error 2 out of memory")


def test_a_cuda_error_falls_back_to_the_cpu_and_is_counted(monkeypatch):
    monkeypatch.setattr(gpu, "GPU_MIN_ROWS", 0)
    x, q = _data(2000, 50)
    vectors = Descriptors([x])
    reported = []
    scanner = GpuScan(vectors, 0, on_fallback=lambda: reported.append(1), index=_BrokenDevice())
    for _ in range(2):
        rows, _ = range_search(scanner, vectors, q, 0.5)
        assert sorted(rows.tolist()) == sorted(exhaustive_search(x, q, 0.5)[0].tolist())
    assert scanner.fallbacks == 2 and len(reported) == 2


def test_a_gallery_asked_for_a_gpu_it_cannot_use_searches_on_the_cpu(tmp_path):
    x, q = _data(50, 5)
    folder = tmp_path / "g"
    with GalleryWriter(folder, SETTINGS, tmp_path, create=True) as w:
        for i, v in enumerate(x):
            w.add(PendingPhoto(f"s/p{i:02d}.jpg", f"{i:064x}", 1000, 1.0, [[10, 60, 60, 10]], v.reshape(1, -1)))
        w.commit()
    plain = Gallery.open(folder)
    gallery = Gallery.open(folder, gpu=99)  # no such device anywhere
    assert isinstance(gallery.scanner, CpuScan)
    assert gallery.search(q, "", 0.45) == plain.search(q, "", 0.45) != []


# -- on a GPU (make gpu-check) ----------------------------------------------------------------------------


@ON_GPU
def test_on_the_gpu_a_whole_gallery_scan_answers_as_the_cpu(monkeypatch):
    x, q = _data(200_000, 3000, seed=3)
    vectors = Descriptors([x[:150_000], x[150_000:]])
    scanner = GpuScan(vectors, 0)
    assert not isinstance(scanner.index, faiss.IndexFlatL2)  # on the device
    for t in (0.3, 0.4, 0.5, 0.6):
        rows, d = range_search(scanner, vectors, q, t)
        ref_rows, ref_d = range_search(CpuScan(vectors), vectors, q, t)
        assert sorted(zip(rows.tolist(), d.tolist(), strict=True)) == sorted(
            zip(ref_rows.tolist(), ref_d.tolist(), strict=True)), t
    for r in range(1, 200):  # gallery rows as queries: each finds itself and its neighbours alike
        rows, _ = range_search(scanner, vectors, x[r], 0.5)
        assert sorted(rows.tolist()) == sorted(range_search(CpuScan(vectors), vectors, x[r], 0.5)[0].tolist())
    assert scanner.fallbacks == 0


@ON_GPU
def test_on_the_gpu_a_gallery_opens_with_its_index_on_the_device(tmp_path):
    x, q = _data(70_000, 40, seed=4)
    folder = tmp_path / "g"
    with GalleryWriter(folder, SETTINGS, tmp_path, create=True) as w:
        for i in range(0, len(x), 4):
            boxes = np.tile([10, 60, 60, 10], (len(x[i : i + 4]), 1))
            w.add(PendingPhoto(f"s{i // 4000}/p{i:06d}.jpg", f"{i:064x}", 1000, 1.0, boxes, x[i : i + 4]))
        w.commit()
    on_gpu, on_cpu = Gallery.open(folder, gpu=0), Gallery.open(folder)
    assert isinstance(on_gpu.scanner, GpuScan)
    for t in (0.4, 0.5):
        assert on_gpu.search(q, "", t) == on_cpu.search(q, "", t) != []
        assert on_gpu.search(q, "s0", t) == on_cpu.search(q, "s0", t)
