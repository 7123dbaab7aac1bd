"""A photo tree is confined to its root (issue 12, finding 4): only regular files whose real path lies under
the root are read, by `fsw-index build` and by a fleet worker's local photo source. A link out of the tree
(to a file or a folder), a FIFO, a device and a symlink loop are skipped with a reason; links that stay in
the tree keep working under their own names; a linked folder in the tree is followed once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.scan import scan_photos
from matcher.errors import ImageError
from matcher.files import open_photo
from worker.photo_source import FolderSource, PhotoUnavailable


@pytest.fixture
def tree(tmp_path: Path, faces_dir: Path) -> Path:
    """photos/Day-1 and Day-2 with real photos, and every kind of path that must not be read."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(faces_dir / "gallery" / "g03.jpg", outside / "private.jpg")
    root = tmp_path / "photos"
    (root / "Day-1").mkdir(parents=True)
    (root / "Day-2").mkdir()
    (root / "Extra").mkdir()
    shutil.copyfile(faces_dir / "gallery" / "g01.jpg", root / "Day-1" / "a.jpg")
    shutil.copyfile(faces_dir / "gallery" / "g02.jpg", root / "Day-2" / "b.jpg")
    shutil.copyfile(faces_dir / "gallery" / "g04.jpg", root / "Extra" / "c.jpg")
    (root / "Day-1" / "same-as-b.jpg").symlink_to("../Day-2/b.jpg")  # stays inside: indexed, own name
    (root / "Day-1" / "outside.jpg").symlink_to(outside / "private.jpg")
    (root / "Day-1" / "elsewhere").symlink_to(outside)
    (root / "Day-1" / "zero.jpg").symlink_to("/dev/zero")
    (root / "Day-1" / "loop").symlink_to("..")
    os.mkfifo(root / "Day-1" / "pipe.jpg")
    return root


def _reasons(skipped: list[tuple[Path, str]], root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): reason for p, reason in skipped}


def test_a_scan_keeps_to_regular_files_in_the_tree(tree: Path) -> None:
    scan = scan_photos([tree], tree)
    assert [p.relative_to(tree).as_posix() for p in scan.photos] == [
        "Day-1/a.jpg", "Day-1/same-as-b.jpg", "Day-2/b.jpg", "Extra/c.jpg"]
    why = _reasons(scan.skipped, tree)
    assert "outside the photo tree" in why["Day-1/outside.jpg"]
    assert "outside the photo tree" in why["Day-1/elsewhere"]
    assert "outside the photo tree" in why["Day-1/zero.jpg"]  # /dev/zero: a device, and outside
    assert "named pipe (FIFO)" in why["Day-1/pipe.jpg"]
    assert "scanned already: not followed again" in why["Day-1/loop"]
    assert set(why) == {"Day-1/outside.jpg", "Day-1/elsewhere", "Day-1/zero.jpg", "Day-1/pipe.jpg", "Day-1/loop"}


def test_a_linked_folder_in_the_tree_is_followed_once(tree: Path) -> None:
    (tree / "Day-1" / "loop").unlink()  # it would bring the whole tree in, once
    (tree / "Day-1" / "extra").symlink_to("../Extra")
    (tree / "Day-1" / "extra-again").symlink_to("../Extra")
    scan = scan_photos([tree / "Day-1"], tree)  # an `add` of Day-1: Extra is reached through the link
    found = [p.relative_to(tree).as_posix() for p in scan.photos]
    assert found == ["Day-1/a.jpg", "Day-1/extra/c.jpg", "Day-1/same-as-b.jpg"]
    assert "scanned already" in _reasons(scan.skipped, tree)["Day-1/extra-again"]


def test_open_photo_refuses_a_fifo_a_device_and_a_link_out_without_blocking(tree: Path) -> None:
    signal.alarm(60)  # a regression would block on the FIFO: fail, do not hang
    try:
        for name, reason in [("pipe.jpg", "named pipe"), ("outside.jpg", "outside the photo tree"),
                             ("zero.jpg", "outside the photo tree")]:
            with pytest.raises(ImageError, match=reason):
                open_photo(tree / "Day-1" / name, tree)
        with pytest.raises(ImageError, match="a device"):
            open_photo("/dev/zero", None)
        with open_photo(tree / "Day-1" / "same-as-b.jpg", tree) as f:
            assert f.read() == (tree / "Day-2" / "b.jpg").read_bytes()
    finally:
        signal.alarm(0)


def test_the_fleet_workers_photo_source_keeps_to_the_tree(tree: Path) -> None:
    source = FolderSource(tree)
    assert source.read("Day-1/same-as-b.jpg") == (tree / "Day-2" / "b.jpg").read_bytes()
    for photo_id, reason in [("Day-1/outside.jpg", "outside the photo tree"), ("Day-1/pipe.jpg", "named pipe"),
                             ("Day-1/zero.jpg", "outside the photo tree"),
                             ("Day-1/elsewhere/private.jpg", "outside the photo tree")]:
        with pytest.raises(PhotoUnavailable, match=reason):
            source.read(photo_id)


def test_a_build_skips_what_is_outside_or_not_a_file_and_does_not_hang(tree: Path, tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    run = subprocess.run([sys.executable, "-m", "indexer.cli", "build", str(tree), "--gallery", str(gallery),
                          "--jobs", "1"], capture_output=True, text=True, timeout=600)  # a safety net, not a timing
    assert run.returncode == 0, run.stderr
    summary = json.loads((gallery / "last-run.json").read_text())
    why = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert "named pipe (FIFO)" in why["Day-1/pipe.jpg"]
    assert "outside the photo tree" in why["Day-1/outside.jpg"] and "outside the photo tree" in why["Day-1/zero.jpg"]
    assert "outside the photo tree" in why["Day-1/elsewhere"]
    assert summary["photos_found"] == 4
    assert "same content as Day-1/same-as-b.jpg" in why["Day-2/b.jpg"]  # the inside link is indexed, own name
