"""The benchmark's sections, each returning a JSON-ready dict; `bench.run` calls them in order."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import build as build_mod
from bench import encoders, worker_jobs
from bench import jobs as jobs_mod
from bench import memory as memory_mod
from bench import scale as scale_mod
from bench import search as search_mod
from bench import stages as stages_mod
from bench.common import QUERY, Config, labels, log, ratio, timed_pairs, timed_together
from bench.galleries import Galleries, RealFaces, SyntheticModel, describe_synthetic, encode_real
from indexer.scan import find_photos
from matcher.encoder import Encoder, EncoderSettings, cores
from matcher.gallery import Gallery


class Context:
    """What the sections share: the configuration, the selfie, encoders, the real faces and galleries."""

    def __init__(self, config: Config, image: str):
        self.config = config
        self.payload = jobs_mod.job_payload(image)
        self._encoders: dict[str, Encoder] = {}
        self._real: RealFaces | None = None
        self._galleries: Galleries | None = None

    def encoder(self, engine: str) -> Encoder:
        if engine not in self._encoders:
            self._encoders[engine] = Encoder(EncoderSettings(engine=engine))  # type: ignore[arg-type]
        return self._encoders[engine]

    @property
    def real(self) -> RealFaces:
        if self._real is None:
            self._real = encode_real(self.encoder("onnx"))
        return self._real

    @property
    def galleries(self) -> Galleries:
        if self._galleries is None:
            self._galleries = Galleries(self.real, max(self.config.gallery_sizes))
        return self._galleries

    @property
    def query(self) -> np.ndarray:
        return self.real.queries[QUERY]

    def real_matches(self) -> list[str]:
        """The photos the query finds in the dev gallery alone: what every gallery must answer."""
        d = np.linalg.norm(self.real.gallery_descriptors - self.query, axis=1)
        owners = [f"real/{Path(item.file).name}" for item, _, faces in self.real.photos for _ in faces]
        return sorted({owners[i] for i in np.flatnonzero(d < 0.5)})

    def synthetic_info(self) -> dict[str, Any]:
        if self._real is None:
            return {}
        real = self.real
        model = SyntheticModel.fit(np.concatenate([real.gallery_descriptors, real.query_descriptors]))
        sample, redrawn = model.draw(100_000, real.avoid)
        info = describe_synthetic(real, sample, redrawn)
        info["redrawn_share"] = round(redrawn / (len(sample) + redrawn), 4)
        info["real_faces_in_each_gallery"] = real.face_count
        info["faces_per_synthetic_photo"] = 4
        if self._galleries is not None:
            info["gallery_write_s"] = {str(k): v for k, v in self.galleries.write_seconds.items()}
        return info


def _ids(result: str) -> list[str]:
    return sorted(m["id"] for m in json.loads(result))


def jobs(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    want = ctx.real_matches()
    out: dict[str, Any] = {"sizes": list(c.gallery_sizes), "fsw": {e: {} for e in c.engines}, "numpy": {},
                           "gallery_open_s": {}, "expected_matches": want, "all_results_real": True}
    for size in c.gallery_sizes:
        path = ctx.galleries.path(size)
        t = time.perf_counter()
        gallery = Gallery.open(path)
        out["gallery_open_s"][str(size)] = round(time.perf_counter() - t, 3)
        scan = jobs_mod.NumpyScan(gallery)
        methods = {engine: partial(jobs_mod.fsw_job, gallery, ctx.encoder(engine), ctx.payload) for engine in c.engines}
        methods["numpy"] = partial(scan.job, ctx.encoder("onnx"), ctx.payload)
        for name, (st, result) in timed_together(methods, c.job_repeats, warmup=2).items():
            (out["numpy"] if name == "numpy" else out["fsw"][name])[str(size)] = st
            out["all_results_real"] &= _ids(result) == want
            log(f"  {name}, {size:,} faces: {st['median_ms']:.0f} ms, {len(json.loads(result))} photos")
        del scan, gallery
    first, last = str(c.gallery_sizes[0]), str(c.gallery_sizes[-1])
    out["largest_over_smallest"] = {
        e: ratio(out["fsw"][e][last]["median_ms"], out["fsw"][e][first]["median_ms"]) for e in c.engines
    }
    # The sizes above are measured one after another, a minute apart on a shared machine: their ratio carries
    # the machine's drift (1.01x to 1.36x in three runs of the same code). The smallest and largest galleries'
    # jobs again, alternated and paired round by round: the ratio the target reads.
    ends = {size: Gallery.open(ctx.galleries.path(int(size))) for size in (first, last)}
    job = {size: partial(jobs_mod.fsw_job, g, ctx.encoder("onnx"), ctx.payload) for size, g in ends.items()}
    # Back to back, as a worker under load runs jobs; and again with an idle pause before each job, which on a
    # virtual machine also measures the host waking the cores (reported beside it, not the target).
    pairs = timed_pairs(job[first], job[last], 3 * c.job_repeats, pause_s=0.0)
    paused = timed_pairs(job[first], job[last], 3 * c.job_repeats, pause_s=0.2)
    out["interleaved"] = {"engine": "onnx", "rounds": 3 * c.job_repeats,
                          "sizes": {first: pairs["first"], last: pairs["second"]},
                          "largest_over_smallest": pairs["ratio"], "ratio_p25_p75": pairs["ratio_p25_p75"],
                          "after_pause": {"pause_s": 0.2, "sizes": {first: paused["first"], last: paused["second"]},
                                          "largest_over_smallest": paused["ratio"],
                                          "ratio_p25_p75": paused["ratio_p25_p75"]}}
    log(f"  onnx, {first} and {last} faces paired: {pairs['ratio']}x back to back (p25-p75 "
        f"{pairs['ratio_p25_p75']}), {paused['ratio']}x after a pause")
    del ends
    if "dlib" in c.engines and "onnx" in c.engines:
        out["onnx_over_dlib"] = {s: ratio(out["fsw"]["onnx"][s]["median_ms"], out["fsw"]["dlib"][s]["median_ms"])
                                 for s in out["fsw"]["onnx"]}
    return out


def search(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    bandwidth = search_mod.copy_bandwidth()
    out: dict[str, Any] = {"bandwidth": bandwidth, "sizes": {}}
    for size in c.gallery_sizes:
        gallery = Gallery.open(ctx.galleries.path(size))
        row = search_mod.measure_search(gallery, ctx.query, c.search_repeats, bandwidth["gb_per_s"])
        out["sizes"][str(size)] = row
        log(f"  search, {size:,} faces: fsw {row['fsw']['median_ms']:.2f} ms ({row['threads']} threads; one "
            f"core {row['fsw_one_core']['median_ms']:.2f}, a stage {row['fsw_stage']['median_ms']:.2f}), faiss "
            f"{row['faiss_range']['median_ms']:.2f}, numpy {row['numpy_matmul']['median_ms']:.2f}, "
            f"floor {row['floor_ms']:.2f}")
        del gallery
    return out


def worker(ctx: Context) -> dict[str, Any]:
    if not worker_jobs.worker_available():
        return {"available": False, "reason": "worker/cli.py or redis-server not found"}
    c = ctx.config
    galleries = {size: ctx.galleries.path(size) for size in c.worker_sizes}
    out = worker_jobs.measure(galleries, ctx.payload, c.job_repeats)
    out["available"] = True
    return out


def memory(ctx: Context) -> dict[str, Any]:
    sizes = ctx.config.memory_sizes
    galleries = {s: (ctx.galleries.empty() if s == 0 else ctx.galleries.path(s)) for s in sizes}
    out = memory_mod.measure(galleries)
    out["sharing"] = memory_mod.sharing(galleries[max(sizes)])
    log(f"  {max(sizes):,} faces: PSS of 4 processes / 1: {out['sharing']['pss_4_over_1']}")
    out["per_image"] = memory_mod.per_image(ctx.galleries.empty().parent / "memory-images")
    log(f"  a 40 MP selfie adds {out['per_image']['selfie']['added_peak_rss_mb']} MiB to a job's peak RSS, a 64 MP "
        f"photo {out['per_image']['photo']['added_peak_rss_mb']} MiB to an encoder process's")
    return out


def stages(ctx: Context) -> dict[str, Any]:
    people = {item.file: item.people for item in labels() if item.split == "query"}
    return stages_mod.measure(ctx.real, people)


def scale(ctx: Context, search_results: dict[str, Any] | None) -> dict[str, Any]:
    if ctx.config.quick:
        return {"skipped": "not in the quick run: writing the 10M-face gallery takes minutes"}
    bandwidth = (search_results or {}).get("bandwidth", {}).get("gb_per_s") or search_mod.copy_bandwidth()["gb_per_s"]
    return scale_mod.measure(ctx.galleries, ctx.encoder("onnx"), str(ctx.payload["image"]), ctx.config.job_repeats,
                             bandwidth)


def old_way(ctx: Context, job_results: dict[str, Any] | None) -> dict[str, Any]:
    c = ctx.config
    tree = build_mod.photo_tree(max(c.tree_photos, max(c.old_way_photos)))
    photos = find_photos([tree])
    runs = []
    for n, repeats in zip(c.old_way_photos, c.old_way_repeats, strict=True):
        row = jobs_mod.measure_old_way(photos[:n], ctx.payload, repeats)
        runs.append(row)
        log(f"  old way, {n} photos: {row['latency']['median_ms'] / 1000:.1f} s")
    largest = runs[-1]
    extrapolated_ms = largest["selfie_ms"] + 1000 * largest["per_photo_ms_mean"]
    out: dict[str, Any] = {
        "jitters": jobs_mod.OLD_JITTERS, "model": jobs_mod.OLD_MODEL, "max_side": jobs_mod.OLD_MAX_SIDE,
        "measured": runs,
        "extrapolated_1000": {"photos": 1000, "median_ms": round(extrapolated_ms, 1),
                              "how": f"selfie encode + 1000 x the mean per-photo cost of the {largest['photos']}-photo "
                              "job (measured per photo in the same run)"},
    }
    if job_results and "fsw" in job_results:
        smallest = str(c.gallery_sizes[0])
        out["ratios"] = {}
        for engine, by_size in job_results["fsw"].items():
            fsw_ms = by_size[smallest]["median_ms"]
            r = {str(row["photos"]): ratio(row["latency"]["median_ms"], fsw_ms) for row in runs}
            r["1000 (extrapolated)"] = ratio(extrapolated_ms, fsw_ms)
            out["ratios"][f"old_over_fsw_{engine}_at_{smallest}_faces"] = r
    return out


def build(ctx: Context) -> dict[str, Any]:
    c = ctx.config
    tree = build_mod.photo_tree(c.tree_photos)
    photos = find_photos([tree])
    window = min(19, len(photos))
    out: dict[str, Any] = {"tree_photos": len(photos), "cores": cores()}
    runs = []
    for jobs in sorted({1, cores()}):
        row = build_mod.build(tree, "onnx", jobs, window)
        runs.append(row)
        log(f"  build, onnx, {jobs} process(es): {row['photos_per_s']:.2f} photos/s")
    out["tree_builds"] = runs
    raw = build_mod.RawLoop(EncoderSettings(), ("onnx",)).run(photos)
    out["write"] = build_mod.write_cost(raw.pop("_results"))
    out["raw_onnx"] = raw
    floor_s = sum(raw["seconds"].values())
    out["raw_onnx"]["floor_photos_per_s"] = round(len(photos) / floor_s, 3)
    one = runs[0]
    out["overhead_over_raw"] = round(one["seconds"] / floor_s - 1, 4)
    out["overhead_over_raw_cpu"] = round(one["cpu_s"] / raw["cpu_s"] - 1, 4)
    if len(runs) > 1:
        out["speedup_2_over_1"] = round(runs[1]["photos_per_s"] / one["photos_per_s"], 3)
        # with every core free, 2 processes could reach (1-process CPU / 2-process CPU) x 2
        out["cpu_2_over_1"] = round(runs[1]["cpu_s"] / one["cpu_s"], 3)
    per_photo = dict(raw["per_photo_ms"])
    per_photo.update({"hash": out["write"]["hash_ms_per_photo"], "write": out["write"]["write_ms_per_photo"]})
    out["per_photo_ms"] = per_photo

    dev = build_mod.dev_gallery_tree(c.dev_photos)
    dev_photos = find_photos([dev])
    engines: dict[str, Any] = {}
    for engine in c.engines:
        jobs = c.pool_jobs or cores()
        builds = [build_mod.build(dev, engine, jobs, len(dev_photos)) for _ in range(c.build_repeats)]
        rates = [b["photos_per_s"] for b in builds]
        engines[engine] = {"photos_per_s": build_mod.rate_stats(rates), "faces": builds[0]["faces"], "jobs": jobs,
                           "photos": builds[0]["photos"]}
        log(f"  build of the dev gallery, {engine}: {np.median(rates):.2f} photos/s")
    raw_dev = build_mod.RawLoop(EncoderSettings(), tuple(c.engines)).run(dev_photos)
    raw_dev.pop("_results")
    engines["raw_per_photo_ms"] = raw_dev["per_photo_ms"]
    if "onnx" in engines and "dlib" in engines:
        engines["onnx_over_dlib"] = ratio(engines["onnx"]["photos_per_s"]["median"],
                                          engines["dlib"]["photos_per_s"]["median"])
    out["dev_gallery"] = engines
    out["add"] = build_mod.measure_add(c.add_bases, c.add_photos, c.add_repeats, tree, c.pool_jobs)
    if len(out["add"]) > 1:
        out["add_largest_over_smallest"] = ratio(out["add"][-1]["latency"]["median_ms"],
                                                 out["add"][0]["latency"]["median_ms"])
    return out


def encoder(ctx: Context) -> dict[str, Any]:
    return encoders.measure(ctx.config)
