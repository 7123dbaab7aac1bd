"""`fsw-index add` and `fsw-index remove` in a loop while a worker answers jobs: no job fails, and every
answer is exactly the answer of one committed gallery version, never a mix of two.

The gallery alternates between two states: A (Day-1/Morning: obama alone, clapton) and B (A plus Day-3:
biden with obama, twice). The expected answer of the query (obama, q19, whole gallery) in each state
is taken from the worker while the gallery is still, and checked against the photos' labels; during
the loop a client keeps sending the query, and each answer must equal A's or B's.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

from indexer.pipeline import index_photos
from matcher.encoder import EncoderSettings
from testkit.jobs import JobOutcome, run_jobs, selfie_job
from testkit.photos import PhotoTree
from testkit.worker_process import BIN, start_worker

from .worker_harness import answer_key

QUEUE = "rel-update"
SETTLE_S = 3.0  # the worker polls the manifest every 2 s: each state is served for a while


def _index(*args: str) -> None:
    done = subprocess.run([str(BIN / "fsw-index"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_add_and_remove_while_serving_give_old_or_new_answers_never_a_mix(
    redis_url: str, faces_dir: Path, photo_tree: PhotoTree, tmp_path: Path, reliability_trials,
    reliability_report,  # type: ignore[no-untyped-def]
) -> None:
    cycles = reliability_trials(3, 1)
    photos, gallery = tmp_path / "photos", tmp_path / "gallery"
    for stage, names in (("Day-1/Morning", ("g05.jpg", "g13.jpg")), ("Day-3", ("g15.jpg", "g02.jpg"))):
        (photos / stage).mkdir(parents=True)
        for name in names:
            shutil.copy(faces_dir / "gallery" / name, photos / stage / name)
    day3 = photos / "Day-3"
    index_photos(gallery, [photos / "Day-1"], EncoderSettings(), photo_root=photos, jobs=1)
    query = selfie_job(faces_dir / "queries" / "q19.jpg")  # obama
    worker = start_worker(redis_url, gallery, QUEUE, tmp_path / "w")
    outcomes: list[JobOutcome] = []
    errors: list[str] = []
    versions = 1
    try:
        (a,) = run_jobs(redis_url, QUEUE, [query])
        _index("add", str(day3), "--gallery", str(gallery), "--jobs", "1")
        versions += 1
        worker.wait_record(lambda rec: rec["gallery_version"] == 2, timeout=30)
        (b,) = run_jobs(redis_url, QUEUE, [query])
        assert a.photo_ids == ["Day-1/Morning/g05.jpg"], a
        assert set(b.photo_ids) == {"Day-1/Morning/g05.jpg", "Day-3/g15.jpg", "Day-3/g02.jpg"}, b
        expected = {"A": answer_key(a.returnvalue), "B": answer_key(b.returnvalue)}

        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                try:
                    outcomes.extend(run_jobs(redis_url, QUEUE, [query, query], timeout=60))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(f"client: {e}")
                    return

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            for _ in range(cycles):
                _index("remove", "Day-3", "--gallery", str(gallery))
                time.sleep(SETTLE_S)
                _index("add", str(day3), "--gallery", str(gallery), "--jobs", "1")
                time.sleep(SETTLE_S)
                versions += 2
        finally:
            stop.set()
            asker.join(timeout=120)
        record = worker.wait_record(lambda rec: rec["gallery_version"] == versions, timeout=30)
        alive = worker.proc.poll() is None
    finally:
        worker.stop()

    seen = {"A": 0, "B": 0}
    failed = [o for o in outcomes if o.state != "completed"]
    wrong = []
    for o in outcomes:
        if o.state == "completed":
            key = answer_key(o.returnvalue)
            match = [name for name, want in expected.items() if key == want]
            if match:
                seen[match[0]] += 1
            else:
                wrong.append(o)
    reliability_report.record(
        "worker: fsw-index add/remove while serving", trials=cycles, jobs_sent=len(outcomes),
        jobs_answered=len(outcomes) - len(failed), wrong_answers=len(wrong),
        notes=f"{versions - 2} gallery versions committed during the loop; answers: {seen['A']} old (A), "
        f"{seen['B']} new (B)",
    )
    assert alive and not errors, errors
    assert not failed, failed[:3]
    assert not wrong, wrong[:3]
    assert seen["A"] and seen["B"], seen  # both versions were served while the loop ran
    assert record["jobs_failed"] == 0
