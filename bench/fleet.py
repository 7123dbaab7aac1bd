"""Fleet builds: `fsw-index build --fleet` with 1 and 2 fsw-worker processes against the local `--jobs` build.

Everything runs on this machine: a private redis-server (`testkit.redis_server`), real `fsw-worker run`
processes (`testkit.fleet.start_encoder`, encode concurrency 1 each, the default), and `index_photos`
with `FleetEncoding`, the library call `fsw-index build --fleet` is a thin face on. The tree is the
build section's (`bench.build.photo_tree`: copies of the dev gallery, each a distinct content). Each
worker is pinned to a core of its own (CPU affinity, which its thread counts follow): two workers stand
for two one-core machines, and the local build uses the same two cores (`--jobs` = cores).

- photos/s: the local build (`local`: `--jobs` = cores; `local_1`: one process on one core, the control
  that says how far this machine's second core scales at the moment), the fleet with 1 worker (the
  other paused by its `worker:<id>:paused` switch) and with 2, interleaved round by round so that other
  load weighs on each alike.
- queue overhead per photo (issue 14's target: under 5% of a photo's encode time), with 1 worker, from
  the jobs' own records (`indexer.fleet.FleetStats`): BullMQ's time on each job (processedOn to finishedOn)
  less the worker's time on its photos (`EncodeResult.seconds`), plus the worker's idle time between jobs,
  per photo. Also the whole build's: its wall time less the worker's time, per photo, which adds the
  fixed costs any build pays (scan and hash, creating the gallery, the last commit and FAISS index).
- selfie latency: a selfie job a second (each sent a second after the previous answer) on the search
  queue, the workers idle, then during one more 2-worker fleet build (whose photos/s is reported apart:
  encoding waits for each selfie); latency = finished - added, as BullMQ records them.

`python -m bench.fleet [--quick]` runs this section alone and writes bench/fleet.json; `bench.run` runs it
as the section `fleet`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from bullmq import Queue

from bench.build import photo_tree
from bench.common import FACES, QUERY, Config, log, stats
from indexer.fleet import FleetEncoding, FleetSettings
from indexer.pipeline import Summary, index_photos
from matcher.encoder import EncoderSettings, cores
from schemas import paused_key
from testkit.fleet import start_encoder
from testkit.redis_server import RedisServer
from testkit.worker_process import WorkerProcess
from worker.submit import add_jobs, job_data, wait_job

HERE = Path(__file__).resolve().parent
SEARCH, ENCODE = "bench-fleet-search", "bench-fleet-encode"
IDLE_SELFIES = 8
SELFIE_EVERY_S = 1.0  # a busy portal's pace for one worker; back to back, selfies would leave no room to encode


def measure(config: Config) -> dict[str, Any]:
    """The section: see the module's docstring."""
    n = 12 if config.quick else config.tree_photos
    rounds = 1 if config.quick else 2
    tree = photo_tree(n)
    out: dict[str, Any] = {"tree_photos": n, "cores": cores(), "rounds": rounds,
                           "batch": FleetSettings().batch, "load_average_start": _load()}
    with tempfile.TemporaryDirectory(prefix="fsw-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "redis").mkdir()
        server = RedisServer(tmp / "redis")
        workers: list[WorkerProcess] = []
        try:
            local_gallery = tmp / "local-0"
            runs: dict[str, list[dict[str, Any]]] = {"local_1": [], "local": [], "fleet_1": [], "fleet_2": []}
            runs["local"].append(_local(tree, local_gallery))  # also the gallery the workers answer selfies from
            workers = [start_encoder(server.url, local_gallery, SEARCH, ENCODE, tmp / f"w{i}", cpus={i % cores()})
                       for i in range(2)]
            idle = _Selfies(server.url)
            idle.run_for(IDLE_SELFIES)
            for r in range(rounds):
                runs["local_1"].append(_local(tree, tmp / f"local1-{r}", cpus={0}))
                if r:
                    runs["local"].append(_local(tree, tmp / f"local-{r}"))
                _pause(server.url, workers[1], True)
                runs["fleet_1"].append(_fleet(server.url, tree, tmp / f"fleet1-{r}"))
                _pause(server.url, workers[1], False)
                runs["fleet_2"].append(_fleet(server.url, tree, tmp / f"fleet2-{r}"))
            probe = _Selfies(server.url)
            probe.start()
            out["fleet_2_with_selfies"] = _fleet(server.url, tree, tmp / "fleet2-selfies")
            probe.stop()
        finally:
            for w in workers:
                w.stop()
            server.stop()
    for name, rows in runs.items():
        rates = [row["photos_per_s"] for row in rows]
        out[name] = {"photos_per_s": round(float(np.median(rates)), 3), "runs": rows}
        log(f"  fleet section, {name}: {out[name]['photos_per_s']:.2f} photos/s (runs: {rates})")
    out["local"]["jobs"] = cores()
    out["local_2_over_1"] = round(out["local"]["photos_per_s"] / out["local_1"]["photos_per_s"], 3)
    out["fleet_2_over_1"] = round(out["fleet_2"]["photos_per_s"] / out["fleet_1"]["photos_per_s"], 3)
    out["fleet_2_over_local"] = round(out["fleet_2"]["photos_per_s"] / out["local"]["photos_per_s"], 3)
    one = runs["fleet_1"]
    queue = float(np.median([r["queue_seconds"] / r["photos"] for r in one]))
    whole = float(np.median([(r["seconds"] - r["worker_seconds"]) / r["photos"] for r in one]))
    encode = float(np.median([r["worker_seconds"] / r["photos"] for r in one]))
    out["queue_overhead"] = {"per_photo_ms": round(queue * 1000, 2), "worker_ms_per_photo": round(encode * 1000, 2),
                             "share": round(queue / encode, 4),
                             "whole_build_per_photo_ms": round(whole * 1000, 2),
                             "whole_build_share": round(whole / encode, 4)}
    out["selfie_latency"] = {"idle": stats(idle.latencies), "during_fleet_build": stats(probe.latencies)}
    out["load_average_end"] = _load()
    return out


def _local(tree: Path, gallery: Path, cpus: set[int] | None = None) -> dict[str, Any]:
    """A local build with every core it may use: all of them, or `cpus` (then one process, in this one)."""
    everything = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        summary = index_photos(gallery, [tree], EncoderSettings(), photo_root=tree, jobs=cores())
    finally:
        os.sched_setaffinity(0, everything)
    return _row(summary)


def _fleet(redis_url: str, tree: Path, gallery: Path) -> dict[str, Any]:
    encoding = FleetEncoding(FleetSettings(redis_url=redis_url, queue=ENCODE))
    summary = index_photos(gallery, [tree], EncoderSettings(), photo_root=tree, encoding=encoding)
    row = _row(summary)
    s = encoding.stats
    row.update({"workers": len(summary.workers), "jobs": s.jobs, "worker_seconds": round(s.worker_seconds, 3),
                "queue_seconds": round(s.queue_seconds, 3)})
    return row


def _row(summary: Summary) -> dict[str, Any]:
    assert not summary.skipped, summary.skipped
    return {"photos": summary.photos_indexed, "faces": summary.faces, "seconds": summary.elapsed_s,
            "photos_per_s": round(summary.photos_indexed / summary.elapsed_s, 3)}


def _pause(redis_url: str, worker: WorkerProcess, paused: bool) -> None:
    """Pause or resume a worker through its switch, and wait until its heartbeat says so."""
    key = paused_key(worker.id)
    with redis.Redis.from_url(redis_url) as r:
        if paused:
            r.set(key, "1")
        else:
            r.delete(key)
    worker.wait_record(lambda rec: (rec["status"] == "paused") == paused, timeout=60)


class _Selfies(threading.Thread):
    """Selfie jobs, each sent a second after the previous is answered; their latencies in seconds."""

    def __init__(self, redis_url: str):
        super().__init__(daemon=True)
        self.redis_url = redis_url
        self.data = job_data(FACES / QUERY)
        self.latencies: list[float] = []
        self._done = threading.Event()

    def run_for(self, count: int) -> None:
        asyncio.run(self._go(count))

    def run(self) -> None:
        asyncio.run(self._go(None))

    def stop(self) -> None:
        self._done.set()
        self.join(120)

    async def _go(self, count: int | None) -> None:
        queue = Queue(SEARCH, {"connection": self.redis_url})
        try:
            while not self._done.is_set() and (count is None or len(self.latencies) < count):
                (job_id,) = await add_jobs(queue, [self.data])
                done = await wait_job(queue, job_id, timeout_s=120, poll_s=0.01)
                if done.state != "completed" or done.added_ms is None or done.finished_ms is None:
                    raise RuntimeError(f"selfie job {job_id} {done.state}: {done.failed_reason}")
                self.latencies.append((done.finished_ms - done.added_ms) / 1000)
                await asyncio.sleep(SELFIE_EVERY_S)
        finally:
            await queue.close()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 photos, one round")
    parser.add_argument("--out", type=Path, default=HERE / "fleet.json", help="where to write the results")
    args = parser.parse_args(argv)
    config = Config.smoke(("onnx",)) if args.quick else Config.full(("onnx",))
    started = time.perf_counter()
    results = {"fleet": measure(config), "elapsed_s": round(time.perf_counter() - started, 1)}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    print(json.dumps(results["fleet"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
