"""`fsw-index rebuild`: a HOG gallery encoded again with YuNet into its next version, while it is served.

One HOG gallery is built per module; each test rebuilds its own copy (the photo root is shared: tests
that add photos add their own files to it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.cli import main as fsw_index
from indexer.pipeline import Progress, index_photos
from indexer.rebuild import STAGING, rebuild
from matcher import forgotten, layout
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import SettingsMismatchError
from matcher.gallery import Gallery
from matcher.query import search_selfie, selfie_descriptor
from matcher.writer import GalleryWriter
from testkit.jobs import run_jobs, selfie_job
from testkit.photos import PhotoTree
from testkit.worker_process import start_worker

HOG = EncoderSettings(detector="hog")
YUNET = EncoderSettings(detector="yunet")
PEOPLE = ("obama", "biden", "leonard")


@pytest.fixture(scope="module")
def hog_gallery(photo_tree: PhotoTree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    gallery = tmp_path_factory.mktemp("hog") / "g"
    index_photos(gallery, [photo_tree.root], HOG, photo_root=photo_tree.root, jobs=1)
    return gallery


@pytest.fixture
def gallery(hog_gallery: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "g"
    shutil.copytree(hog_gallery, copy)
    return copy


def live_ids(gallery: Path) -> set[str]:
    g = Gallery.open(gallery)
    return {str(pid) for pid, shown in zip(g.photo_ids, g.photo_live, strict=True) if shown}


def found(g: Gallery, encoder: Encoder, tree: PhotoTree) -> dict[str, set[str]]:
    """Each person's photos that their queries find; AssertionError on a photo of someone else."""
    out: dict[str, set[str]] = {}
    for q in tree.queries:
        (person,) = q.people
        if person not in PEOPLE:
            continue
        ids = {m.id for m in search_selfie(g, encoder, q.path)}
        assert ids <= tree.photos_of(person), f"{q.file} ({person}) got {ids - tree.photos_of(person)}"
        out.setdefault(person, set()).update(ids)
    return out


def test_hog_gallery_rebuilt_with_yunet_keeps_its_photos_and_finds_people(
    gallery: Path, photo_tree: PhotoTree, encoder: Encoder
) -> None:
    before = layout.read_manifest(gallery)
    assert before.settings["detector"] == "hog"
    old = Gallery.open(gallery)  # a HOG gallery serves as it is, with no action
    old_found = found(old, encoder, photo_tree)
    assert all(old_found.get(p) for p in PEOPLE)
    ids = live_ids(gallery)

    result = CliRunner().invoke(fsw_index, ["rebuild", "--gallery", str(gallery), "--detector", "yunet", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "holds the new settings" in result.output

    after = layout.read_manifest(gallery)
    assert after.version > before.version and after.settings == YUNET.recorded()
    assert live_ids(gallery) == ids
    new_found = found(Gallery.open(gallery), encoder, photo_tree)
    assert all(new_found.get(p) for p in PEOPLE)
    assert found(old, encoder, photo_tree) == old_found  # the Gallery opened before still searches its version
    assert not (gallery / STAGING).exists()
    verified = CliRunner().invoke(fsw_index, ["verify", "--gallery", str(gallery)])
    assert verified.exit_code == 0, verified.output

    again = CliRunner().invoke(fsw_index, ["rebuild", "--gallery", str(gallery), "--detector", "yunet"])
    assert again.exit_code == 0 and "already has these settings" in again.output
    assert layout.read_manifest(gallery).version == after.version
    with pytest.raises(SettingsMismatchError):  # an add with HOG is refused from now on
        GalleryWriter(gallery, HOG.recorded())


def test_removed_photos_stay_removed_forgotten_faces_carry_over_and_gone_files_are_reported(
    gallery: Path, photo_tree: PhotoTree, encoder: Encoder
) -> None:
    obama = next(q for q in photo_tree.queries if q.people == frozenset({"obama"}))
    (removed, *_) = sorted(photo_tree.photos_of("biden"))
    gone = photo_tree.root / "Day-1" / f"gone-{gallery.parent.name}.jpg"
    gone.write_bytes((photo_tree.root / removed).read_bytes() + b"gone")  # not a duplicate: other content
    assert index_photos(gallery, [gone], HOG, command="add", jobs=1).photos_indexed == 1
    gone.unlink()
    entry = forgotten.make(selfie_descriptor(encoder, obama.path))
    with GalleryWriter(gallery, HOG.recorded()) as w:
        assert w.remove([removed]) == [removed]
        w.forget([entry])
        w.commit()
    assert not {m.id for m in search_selfie(Gallery.open(gallery), encoder, obama.path)}  # forgotten: hidden
    ids = live_ids(gallery)

    done = rebuild(gallery, YUNET, jobs=1)

    assert done.switched and done.missing == [gone.relative_to(photo_tree.root).as_posix()]
    assert live_ids(gallery) == ids - set(done.missing) and removed not in live_ids(gallery)
    g = Gallery.open(gallery)
    assert [e.id for e in g.forgotten] == [entry.id]
    assert not {m.id for m in search_selfie(g, encoder, obama.path)}  # hidden in the new version too


def test_an_add_and_a_remove_during_the_rebuild_are_in_the_new_version(
    gallery: Path, photo_tree: PhotoTree
) -> None:
    new = photo_tree.root / "Day-2" / f"late-{gallery.parent.name}.jpg"
    new.write_bytes((photo_tree.root / sorted(photo_tree.photos_of("obama"))[0]).read_bytes() + b"late")
    (removed, *_) = sorted(photo_tree.photos_of("leonard"))
    changed = []

    def meanwhile(progress: Progress) -> None:  # while the staging build runs, without the rebuild's lock
        if not changed:
            changed.append(index_photos(gallery, [new], HOG, command="add", jobs=1))
            with GalleryWriter(gallery, HOG.recorded()) as w:
                w.remove([removed])
                w.commit()

    ids = live_ids(gallery)
    done = rebuild(gallery, YUNET, jobs=1, on_progress=meanwhile)

    assert done.switched and done.rounds == 2
    expected = (ids | {new.relative_to(photo_tree.root).as_posix()}) - {removed}
    assert live_ids(gallery) == expected
    assert layout.read_manifest(gallery).settings == YUNET.recorded()


KILL_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    from indexer.rebuild import rebuild
    from matcher.encoder import EncoderSettings

    def kill_after_two_commits(progress):  # checkpoint_s=0 commits after every photo
        if progress.done >= 3:
            os.kill(os.getpid(), signal.SIGKILL)

    rebuild(sys.argv[1], EncoderSettings(detector="yunet"), jobs=1, checkpoint_s=0, on_progress=kill_after_two_commits)
""")


def test_a_rebuild_killed_midway_leaves_the_old_version_serving_and_resumes(gallery: Path) -> None:
    before = layout.read_manifest(gallery)
    ids = live_ids(gallery)
    killed = subprocess.run([sys.executable, "-c", KILL_MIDWAY, str(gallery)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    staged = layout.read_manifest(gallery / STAGING)
    assert 0 < staged.photos < len(ids)  # it died midway, with photos committed to the staging gallery
    assert layout.read_manifest(gallery) == before and live_ids(gallery) == ids  # the old version serves

    shown = CliRunner().invoke(fsw_index, ["info", "--gallery", str(gallery)])
    assert f"rebuild staged in {gallery / STAGING}: {staged.photos} photos" in shown.output

    other = CliRunner().invoke(fsw_index, ["rebuild", "-g", str(gallery), "--detector", "yunet", "--min-face", "30"])
    assert other.exit_code == 1 and "unfinished rebuild with other settings" in other.output  # never mixed

    result = CliRunner().invoke(fsw_index, ["rebuild", "--gallery", str(gallery), "--detector", "yunet", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert f"{staged.photos} already indexed" in result.output  # resumed: those were not encoded again
    assert layout.read_manifest(gallery).settings == YUNET.recorded() and live_ids(gallery) == ids


def test_a_worker_serves_during_the_rebuild_and_picks_up_the_new_version(
    gallery: Path, photo_tree: PhotoTree, redis_url: str, tmp_path: Path
) -> None:
    queue = f"fsw-rebuild-{os.getpid()}"
    obama = next(q for q in photo_tree.queries if q.people == frozenset({"obama"}))
    worker = start_worker(redis_url, gallery, queue, tmp_path / "worker", "--gpus", "cpu")
    try:
        old_version = layout.read_manifest(gallery).version
        assert worker.wait_record(lambda rec: rec.get("gallery_version") is not None)["gallery_version"] == old_version
        answered = []

        def serving(progress: Progress) -> None:  # a job answered while the staging build runs
            if not answered:
                (outcome,) = run_jobs(redis_url, queue, [selfie_job(obama.path)])
                answered.append(outcome.photo_ids)

        done = rebuild(gallery, YUNET, jobs=1, on_progress=serving)
        assert answered and set(answered[0]) <= photo_tree.photos_of("obama") and answered[0]
        worker.wait_record(lambda rec: rec.get("gallery_version") == done.version)
        (after,) = run_jobs(redis_url, queue, [selfie_job(obama.path)])
        assert after.photo_ids and set(after.photo_ids) <= photo_tree.photos_of("obama")
    finally:
        worker.stop()


def test_a_rebuild_that_dies_at_the_switch_leaves_a_readable_gallery_and_the_same_command_finishes(
    gallery: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, ids = layout.read_manifest(gallery), live_ids(gallery)

    def die(*_: object) -> None:
        raise SystemExit("killed")

    with monkeypatch.context() as m:  # dies after linking the staged files in, before the manifest names them
        m.setattr(GalleryWriter, "switch", die)
        with pytest.raises(SystemExit):
            rebuild(gallery, YUNET, jobs=1)
    assert list(gallery.glob("gallery-v*-0.h5"))  # linked in, named by no manifest
    assert layout.read_manifest(gallery) == before and live_ids(gallery) == ids
    with monkeypatch.context() as m:  # dies after the switch, before the staging folder is deleted
        m.setattr("indexer.rebuild._clear_staging", die)
        with pytest.raises(SystemExit):
            rebuild(gallery, YUNET, jobs=1)
    switched = layout.read_manifest(gallery)
    assert switched.settings == YUNET.recorded() and live_ids(gallery) == ids and (gallery / STAGING).exists()

    done = rebuild(gallery, YUNET, jobs=1)
    assert not done.switched and done.version == switched.version and not (gallery / STAGING).exists()
    verified = CliRunner().invoke(fsw_index, ["verify", "--gallery", str(gallery)])
    assert verified.exit_code == 0, verified.output
