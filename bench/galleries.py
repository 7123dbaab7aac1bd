"""Galleries of 1k to 1M faces for the benchmarks: the dev gallery's real faces plus synthetic ones.

Encoding a million photos would take days on 2 cores, so the large galleries are the 19 real dev
photos (encoded by fsw) plus synthetic 128-d descriptors written through `matcher.writer.GalleryWriter`,
exactly as `fsw-index` writes real ones. The synthetic descriptors are drawn to resemble real ones:
Gaussian with the mean and covariance of the real descriptors (gallery and query faces; the covariance
is shrunk towards its average variance because there are fewer faces than dimensions), then each is
rescaled to a norm drawn from the real norms' normal fit. A draw within `MARGIN` of any descriptor a
query's job could search with (the selfie's own, as `matcher.query.selfie_descriptor` gives it, and its
means with the gallery faces it matches, which query expansion may use) is redrawn, so no synthetic face
can match a selfie and every result stays a real photo.

Galleries are cached under `FSW_BENCH_CACHE` (default /tmp/fsw-bench-cache), keyed by the real
descriptors and the generator's version; a smaller gallery's synthetic faces are a prefix of a larger one's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import CACHE, ROOT, gallery_photos, labels, log
from indexer.labels import Label
from matcher import layout
from matcher.encoder import Encoder, EncoderSettings, Face
from matcher.images import load_image
from matcher.query import selfie_descriptor
from matcher.writer import GalleryWriter, PendingPhoto

GENERATOR_VERSION = 5  # 5: galleries with the projected codes file (`matcher.coarse`); 4: STAGE_FACES in "real"
MARGIN = 0.55  # above the 0.5 match distance, with room for float32 rounding
EXPANSION_FACES = 6  # a query's closest gallery faces whose averages with it are kept clear of
FACES_PER_PHOTO = 4
STAGE_FACES = 4000  # synthetic faces per stage (folder): 1,000 photos, an event session's worth
REAL_STAGE = "real"  # the real photos' stage, a job's stage in the staged measurements
SHRINK = 0.1
_SEED = 20241129
_BLOCK = 1 << 16


@dataclass
class RealFaces:
    """The dev set encoded by fsw: gallery photos with their faces, and the query selfies' descriptors."""

    photos: list[tuple[Label, str, list[Face]]]  # (label, sha256, faces)
    queries: dict[str, np.ndarray]  # query file -> the descriptor a job searches with (`selfie_descriptor`)
    avoid: np.ndarray  # every descriptor a job for a query might search with: no synthetic face goes near them

    @property
    def gallery_descriptors(self) -> np.ndarray:
        return np.stack([f.descriptor for _, _, faces in self.photos for f in faces]).astype(np.float32)

    @property
    def query_descriptors(self) -> np.ndarray:
        return np.stack(list(self.queries.values())).astype(np.float32)

    @property
    def face_count(self) -> int:
        return sum(len(faces) for _, _, faces in self.photos)

    def key(self) -> str:
        h = hashlib.sha256(f"v{GENERATOR_VERSION}:{FACES_PER_PHOTO}:{MARGIN}:{SHRINK}".encode())
        h.update(json.dumps(EncoderSettings().recorded(), sort_keys=True).encode())
        h.update(np.round(self.gallery_descriptors, 4).tobytes())
        h.update(np.round(self.avoid, 4).tobytes())
        return h.hexdigest()[:12]


def encode_real(encoder: Encoder | None = None) -> RealFaces:
    """The dev set's faces with the default settings; cached by the photos' content and the settings."""
    items = labels()
    h = hashlib.sha256(json.dumps(EncoderSettings().as_dict(), sort_keys=True).encode())
    for source in sorted((ROOT / "matcher").glob("*.py")):  # the selfie's path may change with the code
        h.update(source.read_bytes())
    for item in items:
        h.update(f"{item.file}:{item.split}:".encode() + hashlib.sha256(item.path.read_bytes()).digest())
    cached = CACHE / f"real-faces-{h.hexdigest()[:12]}.pkl"
    if cached.is_file():
        with open(cached, "rb") as f:
            return pickle.load(f)  # noqa: S301 - our own cache file
    real = _encode_real(encoder or Encoder(EncoderSettings()))
    CACHE.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(cached, pickle.dumps(real))
    return real


def _encode_real(encoder: Encoder) -> RealFaces:
    from matcher.errors import NoFaceError

    photos = []
    for item in gallery_photos():
        faces = encoder.faces(load_image(item.path))
        photos.append((item, layout.file_sha256(item.path), faces))
    gallery = np.stack([f.descriptor for _, _, faces in photos for f in faces])
    queries, avoid = {}, []
    for item in labels():
        if item.split != "query":
            continue
        image = load_image(item.path)
        try:
            plain = encoder.selfie(image).descriptor
        except NoFaceError:
            continue
        used = selfie_descriptor(encoder, image)
        queries[item.file] = used
        avoid += [plain, used]
        # query expansion averages the selfie with gallery faces it matched: keep clear of every such mean
        d = np.linalg.norm(gallery - used, axis=1)
        near = gallery[np.argsort(d)[: min(EXPANSION_FACES, int((d < 0.5).sum()))]]
        for k in range(1, len(near) + 1):
            avoid += [np.mean([used, *subset], axis=0) for subset in itertools.combinations(near, k)]
    return RealFaces(photos, queries, np.stack(avoid).astype(np.float32))


@dataclass
class SyntheticModel:
    mean: np.ndarray
    chol: np.ndarray
    norm_mean: float
    norm_std: float

    @classmethod
    def fit(cls, real: np.ndarray) -> SyntheticModel:
        x = real.astype(np.float64)
        cov = np.cov(x, rowvar=False)
        cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        norms = np.linalg.norm(x, axis=1)
        return cls(x.mean(axis=0), np.linalg.cholesky(cov), float(norms.mean()), float(norms.std()))

    def draw(self, n: int, avoid: np.ndarray, seed: int = _SEED) -> tuple[np.ndarray, int]:
        """n descriptors (float32), none within MARGIN of a row of `avoid`; and how many were redrawn.

        Each block of `_BLOCK` rows has its own seed, so a smaller draw is a prefix of a larger one.
        """
        out = np.empty((n, 128), np.float32)
        return out, self.draw_into(out, avoid, seed)

    def draw_into(self, out: np.ndarray, avoid: np.ndarray, seed: int = _SEED) -> int:
        """`draw` into `out` (n, 128), a file's memory map for the largest galleries; returns the redrawn."""
        n = len(out)
        redrawn = 0
        for lo in range(0, n, _BLOCK):
            rng = np.random.default_rng([seed, lo // _BLOCK])
            m = min(_BLOCK, n - lo)
            block = self._sample(rng, _BLOCK)[:m]
            near = np.flatnonzero(_min_distance(block, avoid) < MARGIN)
            while len(near):
                redrawn += len(near)
                block[near] = self._sample(rng, len(near))
                near = near[_min_distance(block[near], avoid) < MARGIN]
            out[lo : lo + m] = block
        return redrawn

    def _sample(self, rng: np.random.Generator, m: int) -> np.ndarray:
        z = rng.standard_normal((m, 128)) @ self.chol.T + self.mean
        target = np.clip(rng.normal(self.norm_mean, self.norm_std, m), 0.5 * self.norm_mean, 1.5 * self.norm_mean)
        return (z * (target / np.linalg.norm(z, axis=1))[:, None]).astype(np.float32)


def _min_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] - 2 * x @ y.T + (y * y).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0)).min(axis=1)


def describe_synthetic(real: RealFaces, synthetic: np.ndarray, redrawn: int) -> dict[str, object]:
    """How the synthetic faces compare with the real ones (for the README's honesty)."""
    rng = np.random.default_rng(1)
    g = real.gallery_descriptors
    sample = synthetic[rng.choice(len(synthetic), min(2000, len(synthetic)), replace=False)]

    def pairwise_median(x: np.ndarray) -> float:
        d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None, :], 0))
        return float(np.median(d[np.triu_indices(len(x), 1)]))

    return {
        "method": "Gaussian with the real descriptors' mean and covariance (shrunk 10% towards the mean "
        "variance), each rescaled to a norm drawn from the real norms' normal fit; draws within "
        f"{MARGIN} of a descriptor a query could search with are redrawn",
        "real_faces_fitted": int(len(g) + len(real.queries)),
        "real_norm_mean": round(float(np.linalg.norm(g, axis=1).mean()), 4),
        "synthetic_norm_mean": round(float(np.linalg.norm(sample, axis=1).mean()), 4),
        "real_pairwise_distance_median": round(pairwise_median(g), 4),
        "synthetic_pairwise_distance_median": round(pairwise_median(sample), 4),
        "synthetic_to_real_gallery_distance_min": round(float(_min_distance(sample, g).min()), 4),
        "synthetic_to_queries_distance_min": round(float(_min_distance(synthetic, real.query_descriptors).min()), 4),
        "kept_clear_of": f"{len(real.avoid)} descriptors: each query's selfie descriptor, with and without the "
        "current selfie path's refinements, and its means with up to 6 of the gallery faces it matches",
        "redrawn": redrawn,
    }


class Galleries:
    """The benchmark galleries, built on first use and cached."""

    def __init__(self, real: RealFaces, largest: int):
        self.real = real
        self.key = real.key()
        self._largest = largest
        self.redrawn = 0
        self.write_seconds: dict[int, dict[str, float]] = {}

    def synthetic(self, n: int | None = None) -> np.ndarray:
        """At least `n` synthetic descriptors (default: for the largest gallery), read-only, from a cached
        file (`synthetic-<key>-<rows>.f32`, memory-mapped: 10M faces are 5 GB); drawn into it first if none
        holds enough. A smaller draw is a prefix of a larger one, so any file long enough will do."""
        n = max(self._largest - self.real.face_count, 0) if n is None else n
        for path in sorted(CACHE.glob(f"synthetic-{self.key}-*.f32")):
            rows = int(path.stem.rsplit("-", 1)[1])
            if rows >= n:
                return np.memmap(path, np.float32, "r", shape=(rows, 128))[:n]
        CACHE.mkdir(parents=True, exist_ok=True)
        path = CACHE / f"synthetic-{self.key}-{n}.f32"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        log(f"  drawing {n:,} synthetic descriptors into {path}")
        out = np.memmap(tmp, np.float32, "w+", shape=(max(n, 1), 128))[:n]
        model = SyntheticModel.fit(np.concatenate([self.real.gallery_descriptors, self.real.query_descriptors]))
        self.redrawn = model.draw_into(out, self.real.avoid)
        out.flush()
        del out
        os.replace(tmp, path)
        return np.memmap(path, np.float32, "r", shape=(max(n, 1), 128))[:n]

    def path(self, faces: int) -> Path:
        """A gallery of `faces` faces (the real ones included), built now unless cached."""
        folder = CACHE / f"gallery-{faces}-{self.key}"
        if layout.is_gallery(folder):
            return folder
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / f".tmp-{os.getpid()}-{faces}-{self.key}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"  writing a gallery of {faces:,} faces to {folder}")
        synthetic = self.synthetic(max(faces - self.real.face_count, 0))
        self.write_seconds[faces] = write_gallery(tmp, self.real, synthetic, real_stage_faces=STAGE_FACES)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def empty(self) -> Path:
        folder = CACHE / f"gallery-0-{self.key}"
        if not layout.is_gallery(folder):
            tmp = CACHE / f".tmp-{os.getpid()}-0-{self.key}"
            shutil.rmtree(tmp, ignore_errors=True)
            with GalleryWriter(tmp, EncoderSettings().recorded(), CACHE / "photos", "bench", create=True):
                pass
            try:
                os.rename(tmp, folder)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder


# Above this many synthetic faces a gallery is written in one commit: the writer's logarithmic merges would
# read millions of rows back into memory to rewrite them, which the indexer never does at this size at once.
_ONE_COMMIT_FACES = 2_000_000


def write_gallery(folder: Path, real: RealFaces | None, synthetic: np.ndarray, photos_prefix: str = "synthetic",
                  faces_per_photo: int = FACES_PER_PHOTO, photo_root: Path = CACHE / "photos",
                  real_stage_faces: int = 0) -> dict[str, float]:
    """A gallery of the real dev photos (ids real/gNN.jpg) and synthetic photos of `faces_per_photo` faces,
    in stages (folders) of STAGE_FACES faces; the first `real_stage_faces` of them in the real photos' stage.

    Returns the seconds it took: `rows` (adding the photos and writing the row files) and `index` (the
    final commit, which writes the FAISS index from the rows: the cache a worker maps).
    """
    t = time.perf_counter()
    with GalleryWriter(folder, EncoderSettings().recorded(), photo_root, "bench", create=True) as writer:
        if real is not None:
            for item, sha, faces in real.photos:
                writer.add(PendingPhoto.from_faces(f"{REAL_STAGE}/{Path(item.file).name}", sha,
                                                   item.path.stat().st_size, 0.0, faces))
        box = np.asarray([10, 110, 110, 10], np.int32)
        step = len(synthetic) if len(synthetic) > _ONE_COMMIT_FACES else 1 << 18
        for lo in range(0, len(synthetic), step):
            block = synthetic[lo : lo + step]
            for k in range(0, len(block), faces_per_photo):
                n = lo + k
                descriptors = block[k : k + faces_per_photo]
                stage = REAL_STAGE if n < real_stage_faces else f"{photos_prefix}/s{n // STAGE_FACES:04d}"
                pid = f"{stage}/p{n:07d}.jpg"
                writer.add(PendingPhoto(pid, hashlib.sha256(pid.encode()).hexdigest(), 100_000, 0.0,
                                        np.tile(box, (len(descriptors), 1)), descriptors))
            writer.commit(final=False)  # bounds the writer's buffer
        rows_s = time.perf_counter() - t
        t = time.perf_counter()
        writer.commit(final=True)
    return {"rows": round(rows_s, 2), "index": round(time.perf_counter() - t, 2)}
