"""Gallery build speed: fsw-index with 1 and 2 processes against dlib's raw calls, and `add` cost.

The photo tree is copies of the dev gallery, each re-encoded after cropping a few pixels so that every
content hash differs (fsw would otherwise index each content once). Builds call
`indexer.pipeline.index_photos`, the library call that `fsw-index build` is a thin face on. The floor
is a plain loop over the same photos calling Pillow, dlib's HOG detector, shape predictor and
`get_face_chip`, and the descriptor network, with fsw's detection settings: what any program doing
this work must spend. The loop also says where a photo's time goes.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from bench.common import CACHE, gallery_photos, log, stats
from bench.galleries import SyntheticModel, encode_real, write_gallery
from indexer.pipeline import Progress, index_photos
from indexer.scan import find_photos
from matcher import layout, models
from matcher.detectors import make_detector
from matcher.encoder import EncoderSettings, cores
from matcher.writer import GalleryWriter, PendingPhoto

TREE_VERSION = 1


def photo_tree(n: int) -> Path:
    """A folder of `n` photos: batch-VV/gNN.jpg, the dev gallery photo NN cropped by VV pixels, cached."""
    root = CACHE / f"tree-{n}-v{TREE_VERSION}"
    if root.is_dir():
        return root
    tmp = CACHE / f".tmp-tree-{os.getpid()}-{n}"
    shutil.rmtree(tmp, ignore_errors=True)
    sources = gallery_photos()
    for i in range(n):
        src, variant = sources[i % len(sources)], i // len(sources)
        dest = tmp / f"batch-{variant:02d}" / Path(src.file).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src.path) as im:
            w, h = im.size
            im.convert("RGB").crop((0, 0, w - variant, h - (variant + 1) // 2)).save(dest, quality=90)
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build(tree: Path, engine: str, jobs: int, window: int) -> dict[str, object]:
    """One `fsw-index build` of `tree` into a fresh gallery: photos/s, faces/s, and per-window rates."""
    marks: list[tuple[float, int]] = []

    def progress(p: Progress) -> None:
        if p.done % window == 0:
            marks.append((time.perf_counter(), p.done))

    with tempfile.TemporaryDirectory(prefix="fsw-bench-build-") as tmp:
        cpu = _cpu_seconds()
        t = time.perf_counter()
        summary = index_photos(Path(tmp) / "g", [tree], EncoderSettings(engine=engine), photo_root=tree,  # type: ignore[arg-type]
                               jobs=jobs, command="build", on_progress=progress)
        seconds = time.perf_counter() - t
        cpu = _cpu_seconds() - cpu
    rates = [window / (b[0] - a[0]) for a, b in zip([(t, 0), *marks], marks, strict=False)]
    return {
        "engine": engine,
        "jobs": jobs,
        "photos": summary.photos_indexed,
        "faces": summary.faces,
        "seconds": round(seconds, 3),
        "photos_per_s": round(summary.photos_indexed / seconds, 3),
        "faces_per_s": round(summary.faces / seconds, 3),
        "cpu_s": round(cpu, 3),  # this process and its finished children: robust to other load, unlike wall time
        "window_photos_per_s": rate_stats(rates),
        "skipped": len(summary.skipped),
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have exited (the pool's, after a build)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rate_stats(rates: list[float]) -> dict[str, float]:
    if not rates:
        return {}
    r = np.asarray(rates)
    return {"median": round(float(np.median(r)), 3), "p25": round(float(np.percentile(r, 25)), 3),
            "p75": round(float(np.percentile(r, 75)), 3), "min": round(float(r.min()), 3),
            "max": round(float(r.max()), 3), "windows": len(r)}


class RawLoop:
    """dlib's own calls, no fsw code but the detector: decode, the settings' detector (`matcher.detectors`:
    YuNet's passes have no dlib form), 5-point landmarks, chip, network."""

    def __init__(self, settings: EncoderSettings, engines: tuple[str, ...]):
        import onnxruntime as ort

        from matcher import onnx_convert

        self.settings = settings
        self.detector = make_detector(settings, threads=cores(), device="cpu")
        self.landmarks = dlib.shape_predictor(models.landmarks_model_path(5))
        self.describe: dict[str, Callable[[list[np.ndarray]], object]] = {}
        if "onnx" in engines:
            options = ort.SessionOptions()
            options.intra_op_num_threads = cores()
            session = ort.InferenceSession(str(onnx_convert.converted_model_path()), options,
                                           providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            self.describe["onnx"] = lambda chips: session.run(None, {name: np.stack(chips)})
        if "dlib" in engines:
            net = dlib.face_recognition_model_v1(models.descriptor_model_path())
            self.describe["dlib"] = lambda chips: net.compute_face_descriptor(chips, 0)

    def run(self, paths: list[Path]) -> dict[str, object]:
        parts: dict[str, list[float]] = {"decode": [], "detect": [], "landmarks_chip": []}
        parts.update({f"descriptor_{k}": [] for k in self.describe})
        faces = 0
        results = []
        cpu = time.process_time()
        for path in paths:
            t0 = time.perf_counter()
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            t1 = time.perf_counter()
            rects = self._detect(rgb)
            t2 = time.perf_counter()
            chips = [dlib.get_face_chip(rgb, self.landmarks(rgb, r), size=150, padding=0.25) for r in rects]
            t3 = time.perf_counter()
            parts["decode"].append(t1 - t0)
            parts["detect"].append(t2 - t1)
            parts["landmarks_chip"].append(t3 - t2)
            out = None
            for name, fn in self.describe.items():
                t = time.perf_counter()
                out = fn(chips) if chips else []
                parts[f"descriptor_{name}"].append(time.perf_counter() - t)
            faces += len(chips)
            results.append((path, rects, np.asarray(out, dtype=np.float32).reshape(-1, 128)))
        cpu = time.process_time() - cpu
        totals = {k: round(float(np.sum(v)), 4) for k, v in parts.items()}
        per_photo_ms = {k: round(float(np.mean(v)) * 1000, 3) for k, v in parts.items()}
        return {"photos": len(paths), "faces": faces, "seconds": totals, "per_photo_ms": per_photo_ms,
                "cpu_s": round(cpu, 3), "_results": results}

    def _detect(self, rgb: np.ndarray) -> list[dlib.rectangle]:
        return self.detector.photo(rgb)


def write_cost(results: list[tuple[Path, list, np.ndarray]]) -> dict[str, float]:
    """fsw's own per-photo work besides encoding: hashing the file, and writing a gallery of these faces."""
    t = time.perf_counter()
    hashes = [layout.file_sha256(p) for p, _, _ in results]
    hash_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="fsw-bench-write-") as tmp:
        t = time.perf_counter()
        with GalleryWriter(Path(tmp) / "g", EncoderSettings().recorded(), Path(tmp), "bench", create=True) as w:
            for (path, rects, desc), sha in zip(results, hashes, strict=True):
                boxes = [(r.top(), r.right(), r.bottom(), r.left()) for r in rects]
                w.add(PendingPhoto(path.name + sha[:8], sha, path.stat().st_size, 0.0, boxes, desc))
            w.commit()
        write_s = time.perf_counter() - t
    n = len(results)
    return {"hash_ms_per_photo": round(hash_s / n * 1000, 3), "write_ms_per_photo": round(write_s / n * 1000, 3)}


def measure_add(bases: tuple[int, ...], new_photos: int, repeats: int, tree: Path, jobs: int | None = None
                ) -> list[dict[str, object]]:
    """`fsw-index add` of `new_photos` photos to galleries of `bases` photos (2 synthetic faces each)."""
    real = encode_real()
    model = SyntheticModel.fit(np.concatenate([real.gallery_descriptors, real.query_descriptors]))
    sources = find_photos([tree])[-new_photos:]
    out = []
    with tempfile.TemporaryDirectory(prefix="fsw-bench-add-") as tmp:
        root = Path(tmp) / "photos"
        (root / "new").mkdir(parents=True)
        for i, src in enumerate(sources):
            shutil.copy(src, root / "new" / f"n{i:02d}-{src.name}")
        for base in bases:
            vectors, _ = model.draw(2 * base, real.query_descriptors, seed=base)
            template = Path(tmp) / f"base-{base}"
            write_gallery(template, None, vectors, photos_prefix="old", faces_per_photo=2, photo_root=root)
            times, indexed = [], 0
            for r in range(repeats):
                g = Path(tmp) / f"g-{base}-{r}"
                shutil.copytree(template, g)
                t = time.perf_counter()
                summary = index_photos(g, [root / "new"], EncoderSettings(), jobs=jobs, command="add")
                times.append(time.perf_counter() - t)
                indexed = summary.photos_indexed
                shutil.rmtree(g)
            out.append({"base_photos": base, "added_photos": indexed, "latency": stats(times)})
            log(f"  add {indexed} photos to {base}: {np.median(times):.2f} s")
    return out


def dev_gallery_tree(n: int) -> Path:
    """The first `n` dev gallery photos as they are (copies: a build skips links that leave the photo tree),
    for the engine comparison."""
    root = CACHE / f"dev-gallery-copies-{n}"
    if not root.is_dir():
        tmp = CACHE / f".tmp-dev-{os.getpid()}-{n}"
        tmp.mkdir(parents=True, exist_ok=True)
        for item in gallery_photos()[:n]:
            shutil.copy(item.path, tmp / Path(item.file).name)
        try:
            os.rename(tmp, root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
