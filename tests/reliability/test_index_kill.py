"""Gallery crash safety at the command line: SIGKILL `fsw-index build` and `fsw-index add` at random times.

Both run with `--jobs 1 --checkpoint-s 0`, so they commit once per photo, in the order of
`find_photos`; kill times are drawn uniformly over the measured duration of an uninterrupted run (the
median of the runs seen so far, since other work on the machine changes it), so they land in start-up,
in encoding and inside commits alike. After each kill:

- `verify_gallery` finds nothing wrong (or, for a build, there is no gallery yet at all);
- the committed version holds exactly the photos it held before the command plus the first k photos
  of the command's order, for some k >= 0, at version (before + k): k = 0 is the gallery before the
  command, any other k a checkpoint the command committed, a superset of it;
- every search answers exactly what the uninterrupted gallery answers with the photos outside that
  version taken out (same ids, order, similarities and boxes; "unknown stage" where the version has no
  photo under the stage yet);
- running the same command again completes the work: it encodes only the n - k missing photos, and
  the gallery then answers exactly as after an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from indexer.labels import Label
from matcher import layout
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import StageError
from matcher.gallery import Gallery
from matcher.query import selfie_descriptor
from matcher.verify import verify_gallery
from testkit.photos import STAGES, lay_out

FSW_INDEX = Path(sys.executable).parent / "fsw-index"
# Kill times are drawn over [0, T], T the median time from start to last commit (+ 0.3 s) of uninterrupted
# runs: start-up, encoding and every commit, including the final one that writes the FAISS index.
OPTIONS = ["--jobs", "1", "--checkpoint-s", "0", "--upsample", "0"]  # upsample 0: half the encoding time
# The first gallery photos, alternately in the two stages: singles, groups of 2 to 4, one without a face.
PHOTOS_FULL, PHOTOS_SHORT = 6, 4
UNKNOWN_STAGE = "unknown stage"

Answer = list[tuple[str, float, tuple[int, ...]]] | str


@dataclass
class Query:
    name: str
    descriptor: np.ndarray
    stage: str


@dataclass
class Setup:
    reference: Path  # an uninterrupted build of every photo
    order: list[str]  # photo ids in commit order
    queries: list[Query]
    answers: dict[tuple[str, str], Answer]  # (query, stage) -> the reference's answer
    build_tree: Path
    # Durations of uninterrupted runs (to the last commit): the first measured before the trials, then
    # every re-run that found nothing of its work committed, so the kill window follows the machine's load.
    build_runs: list[float]
    add_tree: Path  # photo root of `base`, which holds stage 1; stage 2 is there to add
    base: Path
    add_runs: list[float]


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(FSW_INDEX), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"fsw-index {args} exited {p.returncode}: {p.stderr}"
    return p


def _timed(*args: str | Path) -> tuple[float, int, str]:
    """Run fsw-index to the end: (time from its start to its last commit plus 0.3 s, exit status, stderr tail)."""
    gallery = Path(args[args.index("-g") + 1])
    log = gallery.with_name(gallery.name + ".log")
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([str(FSW_INDEX), *map(str, args)], stdout=subprocess.DEVNULL, stderr=err)
        version, last_change = layout.manifest_version(gallery), start
        while proc.poll() is None:
            now = layout.manifest_version(gallery)
            if now != version:
                version, last_change = now, time.monotonic()
            time.sleep(0.01)
    return min(time.monotonic(), last_change + 0.3) - start, proc.returncode, log.read_text()[-300:]


def _measured(*args: str | Path) -> float:
    duration, status, err = _timed(*args)
    assert status == 0, f"fsw-index {args} exited {status}: {err}"
    return duration


def _answers(gallery: Gallery, queries: list[Query], keep: set[str] | None = None) -> dict[tuple[str, str], Answer]:
    out: dict[tuple[str, str], Answer] = {}
    for q in queries:
        try:
            found = gallery.search(q.descriptor, q.stage)
        except StageError:
            out[q.name, q.stage] = UNKNOWN_STAGE
            continue
        out[q.name, q.stage] = [(m.id, m.similarity, m.box) for m in found if keep is None or m.id in keep]
    return out


def _restricted(setup: Setup, keep: set[str]) -> dict[tuple[str, str], Answer]:
    """The reference's answers with only the photos in `keep`: what a committed checkpoint must answer."""
    out: dict[tuple[str, str], Answer] = {}
    for (name, stage), answer in setup.answers.items():
        if stage and not any(p.startswith(stage + "/") for p in keep):
            out[name, stage] = UNKNOWN_STAGE
        else:
            assert not isinstance(answer, str)
            out[name, stage] = [a for a in answer if a[0] in keep]
    return out


@pytest.fixture(scope="module")
def setup(labels: list[Label], tmp_path_factory: pytest.TempPathFactory, reliability_full: bool) -> Setup:
    tmp = tmp_path_factory.mktemp("index-kill")
    photos = [x for x in labels if x.split == "gallery"][: PHOTOS_FULL if reliability_full else PHOTOS_SHORT]
    queries_labelled = [x for x in labels if x.split == "query"]
    build_tree = lay_out(photos + queries_labelled, tmp / "build-photos")
    reference = tmp / "reference"
    build_s = _measured("build", build_tree.root, "-g", reference, *OPTIONS)
    g = Gallery.open(reference)
    order = [str(p) for p in g.photo_ids]
    encoder = Encoder(EncoderSettings.from_recorded(g.settings))
    people = set().union(*build_tree.people.values()) - {"unknown", "none"}
    queries: list[Query] = []
    for q in queries_labelled:
        if next(iter(q.people)) in people:
            d = selfie_descriptor(encoder, q.path)
            queries += [Query(q.file, d, stage) for stage in ("", *STAGES)]
    for r in range(len(g.vectors)):  # every gallery face finds its own photo
        queries.append(Query(f"face {r} of {g.photo_ids[g.face_photo[r]]}", g.vectors[r].copy(), ""))
    add_tree = tmp / "add-photos"
    shutil.copytree(build_tree.root / STAGES[0], add_tree / STAGES[0])
    base = tmp / "base"
    _run("build", add_tree, "-g", base, *OPTIONS)
    shutil.copytree(build_tree.root / STAGES[1], add_tree / STAGES[1])
    measured = tmp / "add-measured"
    shutil.copytree(base, measured)
    add_s = _measured("add", add_tree / STAGES[1], "-g", measured, *OPTIONS)
    setup = Setup(reference, order, queries, _answers(g, queries), build_tree.root, [build_s], add_tree, base, [add_s])
    assert _answers(Gallery.open(measured), queries) == setup.answers, "an uninterrupted add differs from a build"
    return setup


@dataclass
class Outcome:
    trials: int = 0
    sent: int = 0
    answered: int = 0
    wrong: int = 0
    recovery: list[float] = field(default_factory=list)
    landed: Counter[str] = field(default_factory=Counter)
    checkpoints: Counter[int] = field(default_factory=Counter)  # new photos committed when the kill came
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def _landed(folder: Path, before: int | None, after: int | None, final: int) -> str:
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    m = layout.read_manifest(folder) if after is not None else None
    named = {layout.H5_NAME, m.index, *(s["file"] for s in m.segments)} if m else {layout.H5_NAME}
    if any(n.endswith(".tmp") for n in names) or any(
        n.startswith(("gallery-v", "index-v")) and n not in named for n in names
    ):
        return "inside a commit"
    if (after or 0) == (before or 0):
        return "before the first commit (start-up, first photo)"
    if after == final:
        return "after the last photo's commit"
    return "between commits (encoding)"


def _trial(setup: Setup, out: Outcome, command: str, folder: Path, rng: random.Random, before: set[str],
           new: list[str], base_version: int | None) -> None:
    runs = setup.build_runs if command == "build" else setup.add_runs
    kill_after = rng.uniform(0, statistics.median(runs))
    args = (["build", setup.build_tree] if command == "build" else ["add", setup.add_tree / STAGES[1]])
    proc = subprocess.Popen([str(FSW_INDEX), *map(str, args), "-g", str(folder), *OPTIONS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed = time.monotonic()
    out.trials += 1
    if proc.returncode not in (-signal.SIGKILL, 0):
        out.failures.append(f"{command} exited {proc.returncode} before the kill: {err.strip()[-300:]}")
        return
    version = layout.manifest_version(folder)
    final = (base_version or 0) + len(new)
    out.landed[_landed(folder, base_version, version, final)] += 1
    k = 0
    if version is None:  # a build killed before its gallery existed: there is nothing to load
        assert command == "build" and base_version is None
        out.checkpoints[0] += 1
    else:
        problems = verify_gallery(folder)
        out.failures += [f"{command} killed at {kill_after:.2f} s: {p}" for p in problems]
        try:
            g = Gallery.open(folder, attempts=1)
        except Exception as e:  # noqa: BLE001 - a gallery that does not load is what this counts
            out.sent += len(setup.queries)
            out.failures.append(f"{command} killed at {kill_after:.2f} s: does not load: {e}")
            return
        live = [str(p) for p in g.photo_ids[g.photo_live]]
        k = len(live) - len(before)
        if set(live[: len(before)]) != before or live[len(before):] != new[: max(k, 0)]:
            out.failures.append(f"{command} killed at {kill_after:.2f} s: photos {live} are not a checkpoint")
        if g.version != (base_version or 0) + k:
            out.failures.append(f"{command} killed at {kill_after:.2f} s: version {g.version} with {k} new photos")
        out.checkpoints[k] += 1
        got, want = _answers(g, setup.queries), _restricted(setup, set(live))
        out.recovery.append(time.monotonic() - killed)
        out.sent += len(want)
        out.answered += len(got)
        wrong = [key for key in want if got.get(key) != want[key]]
        out.wrong += len(wrong)
        if wrong:
            out.failures.append(f"{command} killed at {kill_after:.2f} s: {len(wrong)} answers differ, "
                                f"first {wrong[0]}")
    duration, status, err = _timed(*args, "-g", folder, *OPTIONS)
    if status != 0:
        out.failures.append(f"{command} re-run exited {status}: {err}")
        return
    if k == 0:
        runs.append(duration)
    summary = json.loads((folder / layout.SUMMARY_NAME).read_text())
    if summary["photos_indexed"] != len(new) - k:
        out.failures.append(f"{command} re-run encoded {summary['photos_indexed']} photos, {len(new) - k} were missing")
    final_answers = _answers(Gallery.open(folder), setup.queries)
    out.sent += len(final_answers)
    out.answered += len(final_answers)
    wrong = [key for key in setup.answers if final_answers.get(key) != setup.answers[key]]
    out.wrong += len(wrong)
    if wrong or verify_gallery(folder):
        out.failures.append(f"{command} re-run: {len(wrong)} answers differ from an uninterrupted run; "
                            f"verify: {verify_gallery(folder)}")


def _record(report, scenario: str, out: Outcome, runs: list[float]) -> None:  # type: ignore[no-untyped-def]
    where = ", ".join(f"{n} {k}" for k, n in out.landed.most_common())
    ks = ", ".join(f"k={k}: {n}" for k, n in sorted(out.checkpoints.items()))
    report.record(
        scenario, trials=out.trials, jobs_sent=out.sent, jobs_answered=out.answered, wrong_answers=out.wrong,
        recovery_s=out.recovery,
        notes=(f"{time.monotonic() - out.started:.0f} s; uninterrupted runs to their last commit {min(runs):.1f} to "
               f"{max(runs):.1f} s (median {statistics.median(runs):.1f}, {len(runs)} runs); "
               f"kills landed: {where}; new photos committed when the kill came: {ks}; {len(out.failures)} failures"
               + (f", first: {out.failures[0]}" if out.failures else "")),
    )


def test_kill_build_keeps_the_last_checkpoint_and_rerun_completes(setup, tmp_path, reliability_trials,
                                                                  reliability_report):
    rng = random.Random(5)
    out = Outcome()
    for trial in range(reliability_trials(20, 3)):
        _trial(setup, out, "build", tmp_path / f"g{trial}", rng, set(), setup.order, None)
    _record(reliability_report, "gallery: SIGKILL fsw-index build", out, setup.build_runs)
    assert not out.failures, "\n".join(out.failures)


def test_kill_add_keeps_the_gallery_or_a_checkpoint_and_rerun_completes(setup, tmp_path, reliability_trials,
                                                                        reliability_report):
    rng = random.Random(6)
    out = Outcome()
    base = Gallery.open(setup.base)
    before = {str(p) for p in base.photo_ids[base.photo_live]}
    new = [p for p in setup.order if p not in before]
    for trial in range(reliability_trials(20, 3)):
        folder = tmp_path / f"g{trial}"
        shutil.copytree(setup.base, folder)
        _trial(setup, out, "add", folder, rng, before, new, base.version)
    _record(reliability_report, "gallery: SIGKILL fsw-index add", out, setup.add_runs)
    assert not out.failures, "\n".join(out.failures)
