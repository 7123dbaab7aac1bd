"""`fsw-index verify` and `verify_gallery` on a real gallery and on damaged copies of it.

The gallery is built here, in one commit, so that it has exactly one row file and an index whatever
the machine's load (a build with checkpoints may write several).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from matcher import layout
from matcher.verify import check_gallery, verify_gallery
from testkit.photos import lay_out

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def sound(labels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from indexer.pipeline import index_photos
    from matcher.encoder import EncoderSettings

    tree = lay_out([x for x in labels if x.split == "gallery"][:6], tmp_path_factory.mktemp("verify-photos"))
    gallery = tmp_path_factory.mktemp("verify") / "g"
    index_photos(gallery, [tree.root], EncoderSettings(upsample=0), photo_root=tree.root, jobs=1, checkpoint_s=1e9)
    return gallery


@pytest.fixture
def copy(sound: Path, tmp_path: Path) -> Path:
    g = tmp_path / "g"
    shutil.copytree(sound, g)
    return g


def _manifest(g: Path) -> dict:
    return json.loads((g / layout.MANIFEST_NAME).read_text())


def _edit_manifest(g: Path, **changes: object) -> None:
    (g / layout.MANIFEST_NAME).write_text(json.dumps({**_manifest(g), **changes}))


def _verify_cli(g: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "fsw-index", "verify", "--gallery", str(g)], capture_output=True, text=True,
                          timeout=120)


def test_a_sound_gallery_passes_with_a_one_line_summary(copy):
    assert verify_gallery(copy) == []
    p = _verify_cli(copy)
    assert p.returncode == 0 and p.stderr == ""
    m = _manifest(copy)
    assert m["photos"] == 6 and m["faces"] > 6 and m["segments"] == []
    assert p.stdout.splitlines() == [
        f"OK: {copy}: version {m['version']}, 6 photos (0 removed), {m['faces']} faces in 1 row file, "
        f"index {m['index']} ({m['faces']} faces)"
    ]


def test_a_truncated_index_fails_its_checksum(copy):
    index = copy / _manifest(copy)["index"]
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    [problem] = verify_gallery(copy)
    assert problem.startswith(f"{index.name}: sha256 ") and "differs from the manifest's index_sha256" in problem
    p = _verify_cli(copy)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.splitlines() == [problem]


def test_a_flipped_byte_in_the_index_is_caught_by_checksum_and_by_its_vectors(copy):
    name = _manifest(copy)["index"]
    data = bytearray((copy / name).read_bytes())
    data[-100] ^= 0x40  # inside the last vector
    (copy / name).write_bytes(bytes(data))
    [problem] = verify_gallery(copy)
    assert problem.startswith(f"{name}: sha256 ")
    from matcher.layout import file_sha256

    _edit_manifest(copy, index_sha256=file_sha256(str(copy / name)))  # as if someone "fixed" the checksum
    faces = _manifest(copy)["faces"]
    assert verify_gallery(copy) == [
        f"{name}: 1 of its {faces} vectors differ from the descriptors in the row files (first: face row {faces - 1})"
    ]


def test_a_manifest_naming_missing_files_says_which(copy):
    _edit_manifest(copy, index="index-v99.faiss")
    assert verify_gallery(copy) == ["index-v99.faiss: named by the manifest but missing"]
    (copy / layout.H5_NAME).unlink()
    assert verify_gallery(copy) == [
        "gallery.h5: named by the manifest but missing",
        "index-v99.faiss: named by the manifest but missing",
    ]


def test_counts_larger_than_the_rows_are_reported_per_dataset(copy):
    m = _manifest(copy)
    _edit_manifest(copy, photos=m["photos"] + 5)
    problems = verify_gallery(copy)
    assert f"gallery.h5: photos/id holds {m['photos']} rows, the manifest names {m['photos'] + 5}" in problems
    assert len(problems) == 7  # one per photo column


def test_a_face_naming_a_photo_that_does_not_exist(copy):
    with h5py.File(copy / layout.H5_NAME, "r+") as h5:
        h5["faces/photo"][3] = 10_000
    problems = verify_gallery(copy)
    assert problems == [f"1 face rows name photo rows outside 0..{_manifest(copy)['photos'] - 1} "
                        "(first: face row 3 -> photo row 10000)"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "manifest.json is not readable JSON"),
        ("[1, 2]", "manifest.json is not a JSON object"),
        ('{"format": 7}', "manifest.json has format 7; this fsw reads formats 1, 2"),
        ('{"format": 2, "version": "x", "photos": -1}', "manifest.json: malformed photos, version"),
    ],
)
def test_a_garbage_manifest_is_named(copy, text, message):
    (copy / layout.MANIFEST_NAME).write_text(text)
    [problem] = verify_gallery(copy)
    assert problem.startswith(message)
    assert _verify_cli(copy).returncode == 1


def test_missing_settings_are_a_problem(copy):
    _edit_manifest(copy, settings={})
    assert verify_gallery(copy) == ["manifest.json records no encoder settings"]
    settings = _manifest(copy)
    _edit_manifest(copy, settings={"detector": "hog"})
    problems = verify_gallery(copy)
    assert problems[0] == "manifest.json: settings lack model, landmarks, upsample, jitters, max_side"
    assert settings  # the row file records the settings it was written with, and they now differ
    assert problems[1] == "gallery.h5: written with other encoder settings than the manifest records"


def test_rows_of_a_writer_that_died_are_not_a_problem(copy):
    m = _manifest(copy)
    with h5py.File(copy / layout.H5_NAME, "r") as h5:
        last = int(h5["faces/photo"][-1])
        cut = int((h5["faces/photo"][:] == last).sum())
    # the manifest of the version before the last photo: its rows are now uncommitted leftovers
    _edit_manifest(copy, photos=last, faces=m["faces"] - cut, index=None, index_faces=0, index_sha256=None,
                   coarse=None)
    verdict = check_gallery(copy)
    assert verdict.problems == [] and "uncommitted rows of an interrupted writer" in verdict.summary()


def test_no_gallery_at_all(tmp_path):
    assert verify_gallery(tmp_path / "nothing") == [f"no gallery at {tmp_path / 'nothing'}: the folder does not exist"]
    assert verify_gallery(tmp_path) == [
        f"manifest.json is missing: {tmp_path} is not a gallery, or its manifest was deleted"
    ]
