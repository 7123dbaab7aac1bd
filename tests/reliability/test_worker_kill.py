"""A worker SIGKILLed while it holds a job: every job still ends, once, with the right answer.

Two real `fsw-worker run` processes (concurrency 1 each) serve one queue; each trial sends a stream of
jobs (large, slow selfies between quick ones), waits until both workers hold a job, waits a random
moment more (so the kill lands in decoding, detection, encoding or search) and SIGKILLs one of them.
The job it held keeps its lock until the lock expires (15 s, renewed every 7.5 s); the survivor's
stalled-job check (every 15 s) finds it without a lock and moves it back to wait (BullMQ's
maxStalledCount 1), and the survivor answers it. Checked: every job ends (none stays active or
waiting), none is lost, each answer equals the answer the same selfie got before the kill, and no job
has two `completed` events. The killed worker is replaced before the next trial.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from testkit.jobs import add_jobs, selfie_job
from testkit.worker_process import WorkerProcess, start_worker

from .worker_harness import active_ids, answer_key, completions_per_job, read_jobs, wait_jobs

QUEUE = "rel-worker-kill"
ENDED_WITHIN_S = 150  # lock expiry (<= 15 s) + two stalled checks (15 s apart) + the queue, under load


def test_killed_worker_jobs_end_once_with_the_right_answer(
    redis_url: str, built_gallery: Path, faces_dir: Path, big_selfie: Path, tmp_path: Path,
    reliability_trials, reliability_report,  # type: ignore[no-untyped-def]
) -> None:
    trials = reliability_trials(2, 1)  # each trial waits out the lock and the stalled check
    rng = random.Random(5)
    slow, quick = selfie_job(big_selfie), selfie_job(faces_dir / "queries" / "q04.jpg")  # both obama
    workers: list[WorkerProcess] = [start_worker(redis_url, built_gallery, QUEUE, tmp_path / f"w{i}", wait=False)
                                    for i in range(2)]
    failures: list[str] = []
    sent = answered = wrong = 0
    recovery: list[float] = []
    landed: list[str] = []
    try:
        for w in workers:
            w.wait_record(lambda rec: rec["status"] != "starting", timeout=120)
        ref_ids = add_jobs(redis_url, QUEUE, [slow, quick])
        ref = wait_jobs(redis_url, QUEUE, ref_ids, timeout=120)
        assert all(j.state == "completed" for j in ref.values()), ref
        expected = {"slow": answer_key(ref[ref_ids[0]].returnvalue), "quick": answer_key(ref[ref_ids[1]].returnvalue)}
        assert expected["slow"] and [i for i, _ in expected["slow"]] == [i for i, _ in expected["quick"]]

        for trial in range(trials):
            kinds = ["slow", "quick", "quick"] * 3
            ids = add_jobs(redis_url, QUEUE, [slow if k == "slow" else quick for k in kinds])
            sent += len(ids)
            deadline = time.monotonic() + 60
            while len(active_ids(redis_url, QUEUE)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 1.0))
            held = active_ids(redis_url, QUEUE)
            at_kill = read_jobs(redis_url, QUEUE, held)
            victim = workers.pop(rng.randrange(len(workers)))
            victim.proc.kill()
            killed_ms = time.time() * 1000
            victim.proc.wait()
            jobs = wait_jobs(redis_url, QUEUE, ids, timeout=ENDED_WITHIN_S)
            events = completions_per_job(redis_url, QUEUE)

            stalled = [j for j in jobs.values() if j.stalled]
            if stalled:
                (moved,) = stalled
                where = {None: "before its first progress", 25: "after decoding", 50: "while encoding",
                         75: "while searching"}.get(at_kill[moved.id].progress if moved.id in at_kill else None,
                                                    "at the end")
                landed.append(where)
                if moved.finished_ms is not None:
                    recovery.append((moved.finished_ms - killed_ms) / 1000)
            else:  # the victim was between jobs when it died
                landed.append("between jobs")
            for job_id, kind in zip(ids, kinds, strict=True):
                j = jobs[job_id]
                if j.state == "completed":
                    answered += 1
                    if answer_key(j.returnvalue) != expected[kind]:
                        wrong += 1
                        failures.append(f"trial {trial}: job {job_id} answered {j.returnvalue}")
                elif j.state == "failed":
                    if not (j.failed_reason or "").strip():
                        failures.append(f"trial {trial}: job {job_id} failed without a reason")
                else:
                    failures.append(f"trial {trial}: job {job_id} still {j.state} {ENDED_WITHIN_S} s after the kill")
                if events.get(job_id, 0) > 1:
                    failures.append(f"trial {trial}: job {job_id} completed {events[job_id]} times")
            if len(stalled) > 1:
                failures.append(f"trial {trial}: {len(stalled)} jobs stalled, one worker was killed")
            if active_ids(redis_url, QUEUE):
                failures.append(f"trial {trial}: jobs left active: {active_ids(redis_url, QUEUE)}")
            if workers[0].proc.poll() is not None:
                failures.append(f"trial {trial}: the surviving worker exited")
                break
            if trial < trials - 1:
                workers.append(start_worker(redis_url, built_gallery, QUEUE, tmp_path / f"w-after-{trial}"))
    finally:
        for w in workers:
            w.stop()
    reliability_report.record(
        "worker: SIGKILL mid-job (2 workers)", trials=trials, jobs_sent=sent, jobs_answered=answered,
        wrong_answers=wrong, recovery_s=recovery,
        notes="recovery = kill to the held job answered by the other worker; lock 15 s, stalled check 15 s; "
        f"kills landed: {', '.join(landed)}; {len(failures)} failures"
        + (f", first: {failures[0]}" if failures else ""),
    )
    assert not failures, "\n".join(failures[:20])
    assert sent == answered and wrong == 0
