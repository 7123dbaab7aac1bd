"""Ten million faces on this machine: the gallery an archive of years of events grows to (5 GB of descriptors).

The gallery is the dev set's real photos plus synthetic faces (`bench.galleries`), in stages of 4,000
faces; the query's stage (`real`) holds its real photos and 4,000 synthetic faces. Measured here:
- writing it through `GalleryWriter`: the row files, then the final commit, which builds the FAISS index
  (the cache a worker maps) from the rows;
- opening it (`Gallery.open`), and a process's memory once it has (bytes a face);
- jobs with and without a stage, against the same jobs on a 1,000-face gallery, interleaved;
- search alone over the whole gallery, next to the memory-bandwidth floor;
- loading it while serving, as a worker does (`worker.reload`: the new version opened in a thread while
  jobs run on the old one, in threads, and the event loop beats): at worker start (no job yet: the loop's
  lag) and at hot reload (jobs on the version in hand: their latency while the new one loads).
Not in `make bench-quick`: writing the gallery takes minutes the first time (cached afterwards).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench import jobs as jobs_mod
from bench import memory as memory_mod
from bench.common import CACHE, QUERY, log, ratio, stats, timed_together
from bench.galleries import REAL_STAGE, STAGE_FACES, Galleries
from matcher.encoder import Encoder
from matcher.gallery import Gallery
from matcher.search import DEFAULT_THRESHOLD

SCALE_FACES = 10_000_000
SMALL_FACES = 1_000
LOOP_TICK_S = 0.01  # the event loop's probe: how late a 10 ms sleep wakes up


def measure(galleries: Galleries, encoder: Encoder, image: str, repeats: int, bandwidth_gb_s: float | None,
            faces: int = SCALE_FACES) -> dict[str, Any]:
    path = galleries.path(faces)
    out: dict[str, Any] = {"faces": faces, "write_s": _write_seconds(galleries, faces)}
    opens = []
    for _ in range(2):  # the first may read the row files from disk; the second finds them in the page cache
        t = time.perf_counter()
        big = Gallery.open(path)
        opens.append(round(time.perf_counter() - t, 2))
        del big
    out["open_s"] = opens
    out.update(_serve(Gallery.open(path), Gallery.open(galleries.path(SMALL_FACES)), encoder, image, repeats,
                      galleries.real.queries[QUERY], bandwidth_gb_s, faces))
    out["memory"] = memory_mod.probe(path)
    m = out["memory"]
    out["bytes_per_face"] = round((m["rss_after_open"] - m["rss_before_open"]) / m["faces"], 1)
    out["private_bytes_per_face"] = round(m["pss_anon"] / m["faces"], 1)  # what each more worker adds
    staged = jobs_mod.job_payload(image, stage=REAL_STAGE)
    out["load_while_serving"] = {
        "start": asyncio.run(_load_while_serving(path, None, encoder, staged)),
        "reload": asyncio.run(_load_while_serving(path, Gallery.open(path), encoder, staged)),
    }
    r = out["load_while_serving"]["reload"]
    log(f"  10M reload: {r['load_s']:.1f} s, {r['jobs_during_load']} jobs meanwhile (p50 during / idle "
        f"{r['during_over_idle']}), loop lag max {r['loop_lag_max_ms']:.0f} ms")
    return out


def _serve(big: Gallery, small: Gallery, encoder: Encoder, image: str, repeats: int, q: Any,
           bandwidth_gb_s: float | None, faces: int) -> dict[str, Any]:
    """Jobs with and without a stage on the large gallery and the small one, interleaved; search alone."""
    out: dict[str, Any] = {}
    out["photos"] = big.photo_count
    synthetic_stage = f"synthetic/s{(faces // STAGE_FACES) // 2:04d}"  # a stage of synthetic faces, mid-gallery
    out["stages"] = {name: _scope_faces(big, name) for name in (REAL_STAGE, synthetic_stage)}
    out["folders"] = len(big.folders)

    payload = partial(jobs_mod.job_payload, image)
    methods = {
        ("1k", "whole"): partial(jobs_mod.fsw_job, small, encoder, payload()),
        ("1k", "stage"): partial(jobs_mod.fsw_job, small, encoder, payload(stage=REAL_STAGE)),
        ("10M", "whole"): partial(jobs_mod.fsw_job, big, encoder, payload()),
        ("10M", "stage"): partial(jobs_mod.fsw_job, big, encoder, payload(stage=REAL_STAGE)),
        ("10M", "synthetic_stage"): partial(jobs_mod.fsw_job, big, encoder, payload(stage=synthetic_stage)),
    }
    runs = timed_together(methods, repeats, warmup=1)
    out["jobs"] = {f"{size}_{kind}": st for (size, kind), (st, _) in runs.items()}
    answers = {f"{size}_{kind}": sorted(m["id"] for m in json.loads(r)) for (size, kind), (_, r) in runs.items()}
    out["answers_equal"] = {
        "whole": answers["10M_whole"] == answers["1k_whole"],
        "stage": answers["10M_stage"] == answers["1k_stage"],
        "synthetic_stage_empty": answers["10M_synthetic_stage"] == [],
    }
    j = out["jobs"]
    out["stage_10m_over_1k"] = ratio(j["10M_stage"]["median_ms"], j["1k_stage"]["median_ms"])
    out["whole_10m_over_1k"] = ratio(j["10M_whole"]["median_ms"], j["1k_whole"]["median_ms"])
    log(f"  10M jobs: whole {j['10M_whole']['median_ms']:.0f} ms, stage {j['10M_stage']['median_ms']:.0f} ms; "
        f"1k: whole {j['1k_whole']['median_ms']:.0f}, stage {j['1k_stage']['median_ms']:.0f}")

    st, _ = timed_together({"whole": lambda: big.search(q, "", DEFAULT_THRESHOLD)}, max(3, repeats), warmup=1)["whole"]
    out["search_whole"] = st
    if bandwidth_gb_s:
        out["floor_ms"] = round(big.vectors.nbytes / (bandwidth_gb_s * 1e9) * 1000, 1)
        out["search_over_floor"] = ratio(st["median_ms"], out["floor_ms"])
    return out


def _scope_faces(gallery: Gallery, stage: str) -> int:
    scope = gallery.scopes[stage]
    return int((scope[:, 1] - scope[:, 0]).sum())


def _write_seconds(galleries: Galleries, faces: int) -> dict[str, Any]:
    """How long writing the gallery took: measured now, or recorded beside the cached gallery by the run
    that wrote it."""
    record = CACHE / f"gallery-{faces}-{galleries.key}.write.json"
    if faces in galleries.write_seconds:
        record.write_text(json.dumps(galleries.write_seconds[faces]))
    return {**json.loads(record.read_text()), "this_run": faces in galleries.write_seconds} if record.is_file() else {}


async def _load_while_serving(path: Path, serving: Gallery | None, encoder: Encoder,
                              payload: dict[str, Any]) -> dict[str, Any]:
    """Open the gallery at `path` in a thread, as `worker.reload` does, while jobs run on `serving` (none at a
    worker's start) in another thread and a ticker measures the event loop's lag; then the same jobs idle."""
    lags: list[float] = []
    during: list[float] = []
    loading = True

    async def ticker() -> None:
        while loading:
            t = time.perf_counter()
            await asyncio.sleep(LOOP_TICK_S)
            lags.append(time.perf_counter() - t - LOOP_TICK_S)

    async def jobs(times: list[float], until: Any) -> None:
        while until():
            t = time.perf_counter()
            await asyncio.to_thread(jobs_mod.fsw_job, serving, encoder, payload)
            times.append(time.perf_counter() - t)

    tasks = [asyncio.create_task(ticker())]
    if serving is not None:
        await asyncio.to_thread(jobs_mod.fsw_job, serving, encoder, payload)  # warm
        tasks.append(asyncio.create_task(jobs(during, lambda: loading)))
    t = time.perf_counter()
    loaded = await asyncio.to_thread(Gallery.open, path)
    load_s = time.perf_counter() - t
    loading = False
    await asyncio.gather(*tasks)
    out: dict[str, Any] = {"load_s": round(load_s, 2), "faces": len(loaded.vectors),
                           "loop_lag_max_ms": round(1000 * max(lags), 1),
                           "loop_lag_p99_ms": round(1000 * statistics.quantiles(lags, n=100)[-1], 1)
                           if len(lags) >= 2 else None, "loop_ticks": len(lags)}
    del loaded
    if serving is not None:
        idle: list[float] = []
        for _ in range(max(5, len(during))):
            t = time.perf_counter()
            await asyncio.to_thread(jobs_mod.fsw_job, serving, encoder, payload)
            idle.append(time.perf_counter() - t)
        out.update({"jobs_during_load": len(during), "during_load": stats(during) if during else None,
                    "idle": stats(idle),
                    "during_over_idle": ratio(statistics.median(during), statistics.median(idle)) if during else None})
    return out
