"""Gallery crash safety at the store: SIGKILL a writer that does nothing but commit, at random points.

Each trial starts `writer_loop.py` on the gallery, kills it after a random delay, and then checks that
the last committed version is intact: `verify_gallery` finds nothing wrong, `Gallery.open` loads it,
its live photos and descriptors are exactly those of that version (the loop's content is a function
of the version alone), searches for its faces find their photos, removed photos stay removed, and the
next writer opens the gallery and commits. Every few trials the gallery starts afresh, so kills also
land in its creation. Where each kill landed is read from what it left on disk.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from matcher import layout
from matcher.gallery import Gallery
from matcher.verify import verify_gallery

from . import writer_loop
from .writer_loop import BATCH, expected

LOOP = Path(writer_loop.__file__)
FRESH_EVERY = 8  # trials per gallery before starting a new one (keeps each gallery small)


def _start(gallery: Path, batch: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(LOOP), str(gallery), "--batch", str(batch)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _landed(out: str, folder: Path) -> str:
    """Where a kill landed: the last phase the loop printed (and whether its manifest was in place)."""
    phases = [line.partition(" ")[2] for line in out.splitlines() if line.startswith("phase ")]
    phase = phases[-1] if phases else "starting Python"
    if phase == "writing the manifest":
        attempted = max((int(x.split()[1]) for x in out.splitlines() if x.startswith("committed")), default=0) + 1
        if layout.manifest_version(folder) == attempted:
            return "after the manifest's rename (deleting old files)"
    return phase


def _check(folder: Path, rng: random.Random, batch: int) -> tuple[int, int, int, list[str]]:
    """(searches sent, answered, wrong, problems) for the committed version."""
    problems = [f"verify: {p}" for p in verify_gallery(folder)]
    try:
        gallery = Gallery.open(folder, attempts=1)
    except Exception as e:  # noqa: BLE001 - a gallery that does not load is the failure measured here
        return 0, 0, 0, [*problems, f"does not load: {e}"]
    want = expected(gallery.version, batch)
    live = set(gallery.photo_ids[gallery.photo_live])
    if live != set(want):
        problems.append(f"v{gallery.version}: live photos differ ({len(live)} vs {len(want)})")
    with_faces = [pid for pid, faces in want.items() if len(faces)]
    sent = answered = wrong = 0
    for pid in rng.sample(with_faces, min(10, len(with_faces))):
        for d in want[pid]:
            sent += 1
            got = gallery.search(d)
            answered += 1
            if not got or got[0].id != pid or got[0].similarity < 0.999:
                wrong += 1
    rows = np.flatnonzero(gallery.face_live)
    faces_by_photo: dict[str, list[np.ndarray]] = {}
    for r in rows:
        faces_by_photo.setdefault(str(gallery.photo_ids[gallery.face_photo[r]]), []).append(gallery.vectors[r])
    for pid, faces in want.items():
        got = np.asarray(faces_by_photo.get(pid, []), np.float32).reshape(-1, 128)
        if not np.array_equal(got, faces):
            problems.append(f"v{gallery.version}: descriptors of {pid} differ")
            break
    return sent, answered, wrong, problems


def test_kill_a_committing_writer_keeps_the_last_version(tmp_path, reliability_full, reliability_trials,
                                                         reliability_report):
    started = time.monotonic()
    trials = reliability_trials(80, 6)
    batch = BATCH if reliability_full else BATCH // 4
    rng = random.Random(20241130)
    landed: Counter[str] = Counter()
    failures: list[str] = []
    sent = answered = wrong = 0
    recovery: list[float] = []
    window = None
    folder = tmp_path / "g0"
    for trial in range(trials):
        if trial % FRESH_EVERY == 0:
            folder = tmp_path / f"g{trial}"
        proc = _start(folder, batch)
        assert proc.stdout is not None
        seen: list[str] = []
        while not seen or (seen[-1] and not seen[-1].startswith("phase opening")):  # until it is about to open
            seen.append(proc.stdout.readline())
        t0 = time.monotonic()
        if window is None:  # measured once: opening and three commits
            while seen[-1] and sum(x.startswith("committed") for x in seen) < 3:
                seen.append(proc.stdout.readline())
            window = time.monotonic() - t0
        time.sleep(max(0.0, t0 + rng.uniform(0, window) - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        out = "".join(seen) + out
        killed_at = time.monotonic()
        if proc.returncode != -signal.SIGKILL:  # it died on its own: the gallery it found was broken
            failures.append(f"trial {trial}: writer exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
        acknowledged = max((int(x.split()[1]) for x in out.splitlines() if x.startswith("committed")), default=0)
        m = layout.read_manifest(folder) if layout.is_gallery(folder) else None
        landed[_landed(out, folder)] += 1
        if m is None:
            continue
        if m.version < acknowledged:
            failures.append(f"trial {trial}: version {m.version} is older than the acknowledged {acknowledged}")
        s, a, w, problems = _check(folder, rng, batch)
        recovery.append(time.monotonic() - killed_at)
        sent, answered, wrong = sent + s, answered + a, wrong + w
        failures += [f"trial {trial}: {p}" for p in problems]
        if problems:
            shutil.copytree(folder, tmp_path / f"failed-{trial}")
            folder = tmp_path / f"g{trial}-after-failure"
    # the last gallery, extended to completion by a writer that is not killed
    done = subprocess.run([sys.executable, str(LOOP), str(folder), "--batch", str(batch), "--commits", "2"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        failures.append(f"final writer failed: {done.stderr.strip().splitlines()[-1:]}")
    else:
        s, a, w, problems = _check(folder, rng, batch)
        sent, answered, wrong = sent + s, answered + a, wrong + w
        failures += [f"final: {p}" for p in problems]
    where = ", ".join(f"{n} {k}" for k, n in landed.most_common())
    reliability_report.record(
        "gallery: kill a committing writer", trials=trials, jobs_sent=sent, jobs_answered=answered,
        wrong_answers=wrong, recovery_s=recovery,
        notes=f"{time.monotonic() - started:.0f} s; batches of about {batch} photos; kills landed: {where}; "
        f"{len(failures)} failures" + (f", first: {failures[0]}" if failures else ""),
    )
    assert not failures, "\n".join(failures[:20])
    assert wrong == 0 and sent == answered
