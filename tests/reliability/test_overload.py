"""Overload: thousands of jobs at once from the portal's own client (Node.js bullmq), two workers.

`tests/node/flood.mjs` adds the jobs with `addBulk` and waits through QueueEvents until each has ended.
Two `fsw-worker run` processes, concurrency 1 each (one per core), answer them. Checked: every job
completes, each with the same answer the selfie got alone, and each worker's resident memory is flat
over the run: the median of the last quarter of the samples is within `RSS_SLACK_MB` (or 5 %) of the
first quarter's. Reported: throughput, latency (added to answered, which under a flood is mostly time
in the queue) and service time (taken by a worker to answered) at p50/p95/p99.

The selfie is a 150 px one (leonard, q08), the portal's smallest realistic upload. Full mode sends 1,000
jobs (`make test` 100): on 2 shared cores the two workers answer 12 to 20 jobs a second, so 2,000 take
about 3 minutes, which with the gallery scenarios took `make reliability` to 13 minutes, over its
10-minute budget. `FSW_RELIABILITY_SCALE=2 make reliability` sends the full 2,000 (passed: 2,000 of
2,000 answered, 11.9 jobs/s, RSS flat).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from testkit.jobs import NODE_CLIENT, add_jobs, selfie_job
from testkit.worker_process import start_worker

from .worker_harness import RssSampler, answer_key, percentile, read_jobs, wait_jobs

QUEUE = "rel-overload"
RSS_SLACK_MB = 25.0


def test_a_flood_of_jobs_all_complete_with_flat_memory(
    redis_url: str, built_gallery: Path, faces_dir: Path, tmp_path: Path, reliability_trials,
    reliability_report,  # type: ignore[no-untyped-def]
) -> None:
    if not (NODE_CLIENT / "node_modules" / "bullmq").is_dir():
        pytest.fail(f"the Node client is not installed: run `make install` (npm ci in {NODE_CLIENT})")
    count = reliability_trials(1000, 100)
    selfie = faces_dir / "queries" / "q08.jpg"
    workers = [start_worker(redis_url, built_gallery, QUEUE, tmp_path / f"w{i}", wait=False) for i in range(2)]
    try:
        for w in workers:
            w.wait_record(lambda rec: rec["status"] != "starting", timeout=120)
        warm = add_jobs(redis_url, QUEUE, [selfie_job(selfie)] * 4)  # both workers past their first job
        ref = wait_jobs(redis_url, QUEUE, warm, timeout=60)
        expected = {json.dumps(answer_key(j.returnvalue)) for j in ref.values() if j.state == "completed"}
        assert len(expected) == 1 and json.loads(next(iter(expected))), ref
        samplers = [RssSampler(w.proc.pid) for w in workers]
        for s in samplers:
            s.__enter__()
        try:
            done = subprocess.run(
                ["node", "flood.mjs", "--redis", redis_url, "--queue", QUEUE, "--selfie", str(selfie),
                 "--count", str(count), "--timeout", "540000"],
                cwd=NODE_CLIENT, capture_output=True, text=True, timeout=600,
            )
        finally:
            for s in samplers:
                s.__exit__()
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        jobs = read_jobs(redis_url, QUEUE, summary["ids"])
        alive = all(w.proc.poll() is None for w in workers)
    finally:
        for w in workers:
            w.stop()

    ended = [j for j in jobs.values() if j.finished_ms is not None]
    completed = [j for j in ended if j.state == "completed"]
    wrong = [j for j in completed if json.dumps(answer_key(j.returnvalue)) not in expected]
    latency = [j.latency_s for j in ended]
    service = [j.service_s * 1000 for j in ended]
    span = (max(j.finished_ms for j in ended) - min(j.timestamp_ms for j in ended)) / 1000  # type: ignore[type-var]
    rss = [s.quarters_mb() for s in samplers]
    grew = [(a, b) for a, b in rss if b - a > max(RSS_SLACK_MB, 0.05 * a)]
    reliability_report.record(
        "worker: overload (Node client, 2 workers)", trials=1, jobs_sent=count, jobs_answered=len(completed),
        wrong_answers=len(wrong),
        notes=f"{len(completed) / span:.1f} jobs/s over {span:.0f} s; latency (added to answered) p50/p95/p99 "
        f"{percentile(latency, 50):.1f}/{percentile(latency, 95):.1f}/{percentile(latency, 99):.1f} s; service time "
        f"p50/p95/p99 {percentile(service, 50):.0f}/{percentile(service, 95):.0f}/{percentile(service, 99):.0f} ms; "
        "worker RSS first -> last quarter "
        + ", ".join(f"{a:.0f} -> {b:.0f} MiB" for a, b in rss)
        + f"; {len(ended) - len(completed)} failed, {count - len(ended)} not ended",
    )
    assert alive, "a worker exited during the flood"
    failed = [j for j in ended if j.state != "completed"]
    assert summary["completed"] == len(completed) == count, {k: summary[k] for k in ("completed", "failed", "pending")}
    assert not failed, failed[:3]
    assert not wrong, wrong[:3]
    assert not grew, f"worker memory grew over the run (first -> last quarter, MiB): {rss}"
