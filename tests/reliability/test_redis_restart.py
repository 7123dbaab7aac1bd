"""Redis stopped and restarted under two serving workers: they reconnect, heartbeat again and answer.

The Redis here has a password and an append-only file (`appendonly yes`), as a production one should,
so the queue survives the restart. Two kinds of trial alternate:

- idle: stop Redis, wait 2 s, start it; then send a job. Recovery is the time from Redis answering
  again to that job completed; both workers' heartbeats must resume.
- in flight: jobs in the workers' hands (held at their gate, `testkit.gate`, until Redis is back) and
  more waiting when Redis stops; after the restart every one of them completes with the right answer
  (a job in hand either finishes once its worker reaches Redis again or, its lock lost, is taken again
  after the stalled check).
"""

from __future__ import annotations

import time
from pathlib import Path

from testkit.gate import Gate
from testkit.jobs import add_jobs, selfie_job
from testkit.redis_server import RedisServer
from testkit.worker_process import WorkerProcess, start_worker

from .worker_harness import active_ids, answer_key, wait_jobs

QUEUE = "rel-redis-restart"
PASSWORD = "fsw-reliability-test-secret"


def test_workers_reconnect_and_answer_after_redis_restarts(
    built_gallery: Path, faces_dir: Path, big_selfie: Path, tmp_path: Path,
    reliability_trials, reliability_report,  # type: ignore[no-untyped-def]
) -> None:
    trials = reliability_trials(4, 2)  # alternately idle and in flight
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password=PASSWORD, persistent=True)
    url = server.url
    gate = Gate(tmp_path / "gate")
    slow, quick = selfie_job(big_selfie), selfie_job(faces_dir / "queries" / "q01.jpg")  # a large upload, a small one
    workers: list[WorkerProcess] = []
    failures: list[str] = []
    sent = answered = wrong = 0
    recovery: list[float] = []
    idle: list[float] = []
    flight: list[float] = []
    try:
        workers = [start_worker(url, built_gallery, QUEUE, tmp_path / f"w{i}", wait=False, gate=gate) for i in range(2)]
        for w in workers:
            w.wait_record(lambda rec: rec["status"] == "online", timeout=120)
        ref_ids = add_jobs(url, QUEUE, [slow, quick])
        ref = wait_jobs(url, QUEUE, ref_ids, timeout=120)
        expected = {"slow": answer_key(ref[ref_ids[0]].returnvalue), "quick": answer_key(ref[ref_ids[1]].returnvalue)}
        assert expected["quick"], ref

        for trial in range(trials):
            in_flight = trial % 2 == 1
            kinds: list[str] = []
            ids: list[str] = []
            if in_flight:
                kinds = ["slow", "slow", "quick", "quick", "quick"]
                gate.close()
                ids = add_jobs(url, QUEUE, [slow if k == "slow" else quick for k in kinds])
                gate.wait_entered(1)
                if not active_ids(url, QUEUE):
                    failures.append(f"trial {trial}: no job in hand when Redis stopped")
            server.stop()
            time.sleep(2)
            server.start()
            gate.open()
            back = time.monotonic()
            back_epoch = time.time()
            if not in_flight:
                kinds, ids = ["quick"], add_jobs(url, QUEUE, [quick])
            jobs = wait_jobs(url, QUEUE, ids, timeout=150)
            sent += len(ids)
            finished = [j.finished_ms for j in jobs.values() if j.finished_ms is not None]
            if finished and not in_flight:
                recovery.append(time.monotonic() - back)
                idle.append(recovery[-1])
            for job_id, kind in zip(ids, kinds, strict=True):
                j = jobs[job_id]
                if j.state != "completed":
                    failures.append(f"trial {trial} ({'in flight' if in_flight else 'idle'}): job {job_id} "
                                    f"{j.state} {j.failed_reason or ''}")
                    continue
                answered += 1
                if answer_key(j.returnvalue) != expected[kind]:
                    wrong += 1
                    failures.append(f"trial {trial}: job {job_id} answered {j.returnvalue}")
            if in_flight and finished:
                recovery.append(max(finished) / 1000 - back_epoch)
                flight.append(recovery[-1])
            for i, w in enumerate(workers):
                if w.proc.poll() is not None:
                    failures.append(f"trial {trial}: worker {i} exited {w.proc.returncode}")
                    continue
                w.wait_record(lambda rec, t=back_epoch: rec["last_heartbeat"] > t
                              and rec["status"] in ("online", "busy"), timeout=30)
        for w in workers:
            log = w.log_text()
            if PASSWORD in log:
                failures.append("the Redis password is in a worker's log")
    finally:
        for w in workers:
            w.stop()
        server.stop()
    reliability_report.record(
        "worker: Redis restart (AOF, password)", trials=trials, jobs_sent=sent, jobs_answered=answered,
        wrong_answers=wrong, recovery_s=recovery,
        notes="recovery = Redis back to the first job answered (idle) / to the last job in the queue answered "
        f"(in flight): idle {_secs(idle)}, in flight {_secs(flight)}; {len(failures)} failures"
        + (f", first: {failures[0]}" if failures else ""),
    )
    assert not failures, "\n".join(failures[:20])
    assert sent == answered and wrong == 0


def _secs(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values) + " s" if values else "-"
