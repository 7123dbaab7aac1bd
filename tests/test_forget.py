"""A graduate can be forgotten: `fsw-index forget` and the portal's `forget-face` job hide their faces.

Rose Leslie (queries/q05) has a portrait (g01) and a group photo with Kit Harington (g10), who has his
own portrait (g11) and selfies q03, q21. Forgetting Rose must hide her faces from every search, face by
face: Kit still finds the group photo.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from bullmq import Queue
from click.testing import CliRunner, Result
from PIL import Image

from indexer import forget as forgetting
from indexer.cli import main
from indexer.labels import Label
from indexer.pipeline import index_photos
from matcher import forgotten, layout
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import GalleryError
from matcher.gallery import Gallery
from matcher.query import search_selfie
from matcher.verify import verify_gallery
from matcher.writer import GalleryWriter
from schemas.forget import FORGET_JOB, FORGOTTEN_HASH
from testkit.jobs import run_jobs, selfie_job
from testkit.photos import PhotoTree
from testkit.worker_process import start_worker
from worker.submit import JOB_OPTIONS, wait_job

ROSE, KIT = "rose_leslie", "kit_harington"


def query(labels: list[Label], person: str, nth: int = 0) -> Path:
    return [x for x in labels if x.split == "query" and x.people == {person}][nth].path


@pytest.fixture
def gallery(built_gallery: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's gallery of the dev faces."""
    return Path(shutil.copytree(built_gallery, tmp_path / "gallery"))


@pytest.fixture
def portal(redis_url: str) -> Iterator[redis.Redis]:
    """The session's Redis, as the CLI reaches it, with no forgotten entries before and after the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(FORGOTTEN_HASH)
    yield client
    client.delete(FORGOTTEN_HASH)
    client.close()


def fsw_index(redis_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env={"REDIS_URL": redis_url}, catch_exceptions=False)


def found(gallery: Path, encoder: Encoder, selfie: Path) -> set[str]:
    return {m.id for m in search_selfie(Gallery.open(gallery), encoder, selfie)}


def entry_ids(result: Result) -> list[str]:
    return [line.split()[1].rstrip(":") for line in result.output.splitlines() if line.startswith("forgotten ")]


def test_forgotten_person_gets_none_of_their_photos_and_others_keep_the_group_photo(
    gallery: Path, encoder: Encoder, labels: list[Label], photo_tree: PhotoTree, redis_url: str, portal: Any,
) -> None:
    rose, kit = photo_tree.photos_of(ROSE), photo_tree.photos_of(KIT)
    group = rose & kit
    assert len(rose) == 2 and len(group) == 1
    assert found(gallery, encoder, query(labels, ROSE)) == rose  # before: her portrait and the group photo

    result = fsw_index(redis_url, "forget", query(labels, ROSE), "-g", gallery)
    assert result.exit_code == 0, result.output
    assert "2 faces hidden now" in result.output

    assert found(gallery, encoder, query(labels, ROSE)) == set()
    for nth in (0, 1):  # both of Kit's selfies still find him, in the group photo too
        assert found(gallery, encoder, query(labels, KIT, nth)) == kit
    info = json.loads(fsw_index(redis_url, "info", "-g", gallery, "--json").output)
    assert (info["forgotten"], info["faces_hidden"]) == (1, 2)
    assert info["faces"] == Gallery.open(gallery).face_count  # hidden faces are still the gallery's
    assert verify_gallery(gallery) == []


def test_a_forget_covers_the_persons_other_selfie_and_the_others_in_their_group_photos(
    gallery: Path, encoder: Encoder, labels: list[Label], photo_tree: PhotoTree,
) -> None:
    """Leonard is in five photos, four of them group photos. Forgotten with one selfie (q22), his other
    selfie (q08) finds none of them at the default threshold (at the search's 0.5 it would still find two);
    each of the others in those photos keeps every photo their selfie found before."""
    others = ["sheldon", "penny", "raj", "howard", "amy", "bernadette"]
    before = {(p, n): found(gallery, encoder, query(labels, p, n)) for p in others for n in (0, 1)
              if len([x for x in labels if x.split == "query" and x.people == {p}]) > n}
    assert found(gallery, encoder, query(labels, "leonard", 1)) & photo_tree.photos_of("leonard")

    forgetting.forget_images(gallery, query(labels, "leonard", 1))

    for nth in (0, 1):
        assert not found(gallery, encoder, query(labels, "leonard", nth)) & photo_tree.photos_of("leonard")
    for (person, nth), photos in before.items():
        assert found(gallery, encoder, query(labels, person, nth)) == photos, person


def test_hidden_faces_never_seed_query_expansion(
    gallery: Path, encoder: Encoder, labels: list[Label], photo_tree: PhotoTree,
) -> None:
    from matcher.expansion import expand_query
    from matcher.query import selfie_descriptor

    forgetting.forget_images(gallery, query(labels, ROSE))
    g = Gallery.open(gallery)
    hidden = set(np.flatnonzero(g.face_hidden).tolist())
    assert hidden
    for item in (x for x in labels if x.split == "query" and "none" not in x.people):
        used = expand_query(g, selfie_descriptor(encoder, item.path)).used
        assert not hidden & set(used.tolist()), item.file


def test_list_and_undo_restore_the_photos(
    gallery: Path, encoder: Encoder, labels: list[Label], photo_tree: PhotoTree, redis_url: str, portal: Any,
) -> None:
    assert fsw_index(redis_url, "forget", "--list", "-g", gallery).output.strip() == "nothing forgotten"
    (entry,) = entry_ids(fsw_index(redis_url, "forget", query(labels, ROSE), "-g", gallery))
    listed = fsw_index(redis_url, "forget", "--list", "-g", gallery).output.splitlines()
    assert len(listed) == 1 and listed[0].startswith(entry) and "2 faces hidden" in listed[0]
    forgotten_file = gallery / layout.read_manifest(gallery).forgotten  # type: ignore[operator]

    result = fsw_index(redis_url, "forget", "--undo", entry, "-g", gallery)
    assert result.exit_code == 0, result.output
    assert found(gallery, encoder, query(labels, ROSE)) == photo_tree.photos_of(ROSE)
    assert fsw_index(redis_url, "forget", "--list", "-g", gallery).output.strip() == "nothing forgotten"
    assert not forgotten_file.exists()  # the descriptor is deleted with the entry
    assert not list(gallery.glob("forgotten-*"))
    manifest = json.loads(layout.manifest_path(gallery).read_text())
    assert manifest["format"] == layout.FORMAT and not {"forgotten", "forgotten_sha256"} & set(manifest)

    again = fsw_index(redis_url, "forget", "--undo", entry, "-g", gallery)
    assert again.exit_code == 1 and f"no forgotten entry {entry}" in again.output


def test_a_forgotten_face_stays_hidden_in_photos_added_later(
    faces_dir: Path, encoder: Encoder, labels: list[Label], tmp_path: Path, redis_url: str, portal: Any,
) -> None:
    tree = tmp_path / "photos" / "Day-1"
    tree.mkdir(parents=True)
    for name in ("g10.jpg", "g11.jpg"):  # the group photo and Kit's portrait; Rose's portrait comes later
        shutil.copy(faces_dir / "gallery" / name, tree / name)
    gallery = tmp_path / "gallery"
    index_photos(gallery, [tree.parent], EncoderSettings(), photo_root=tree.parent, jobs=1)
    assert fsw_index(redis_url, "forget", query(labels, ROSE), "-g", gallery).exit_code == 0

    shutil.copy(faces_dir / "gallery" / "g01.jpg", tree / "g01.jpg")
    recorded = EncoderSettings.from_recorded(layout.read_manifest(gallery).settings)
    summary = index_photos(gallery, [tree / "g01.jpg"], recorded, jobs=1, command="add")
    assert summary.photos_indexed == 1 and summary.faces == 1

    assert found(gallery, encoder, query(labels, ROSE)) == set()
    assert found(gallery, encoder, query(labels, KIT)) == {"Day-1/g10.jpg", "Day-1/g11.jpg"}
    assert Gallery.open(gallery).face_hidden.sum() == 2


def test_a_folder_of_face_images_forgets_each_face_and_reports_images_without_one(
    gallery: Path, encoder: Encoder, labels: list[Label], photo_tree: PhotoTree, tmp_path: Path, redis_url: str,
    portal: Any,
) -> None:
    """The old worker's exclude_faces/ as operators have it: face crops, one of them not a face at all."""
    g = Gallery.open(gallery)
    folder = tmp_path / "exclude_faces"
    folder.mkdir()
    for photo_id in sorted(photo_tree.photos_of(ROSE)):
        row = _face_nearest(g, encoder, query(labels, ROSE), photo_id)
        top, right, bottom, left = (int(v) for v in g.face_boxes[row])
        h, w = bottom - top, right - left
        with Image.open(photo_tree.root / photo_id) as im:
            im.convert("RGB").crop((max(0, left - w // 2), max(0, top - h // 2), right + w // 2, bottom + h // 2)) \
                .save(folder / f"{Path(photo_id).stem}-rose.jpg")
    shutil.copy(query(labels, "none"), folder / "no-face.jpg")
    (folder / "notes.txt").write_text("not an image: not read")

    result = fsw_index(redis_url, "forget", folder, "-g", gallery)
    assert result.exit_code == 1  # an image gave no face: said, and the others are forgotten all the same
    assert "skipped" in result.output and "no-face.jpg" in result.output and "no face" in result.output
    assert len(entry_ids(result)) == 2
    assert found(gallery, encoder, query(labels, ROSE)) == set()
    assert found(gallery, encoder, query(labels, KIT)) == photo_tree.photos_of(KIT)
    assert {e.source for e in Gallery.open(gallery).forgotten} == {"folder"}


def test_what_is_kept_is_the_descriptor_alone_readable_by_its_owner(
    gallery: Path, labels: list[Label], redis_url: str, portal: Any,
) -> None:
    selfie = query(labels, ROSE)
    before = {p.name for p in gallery.iterdir()}
    (entry,) = entry_ids(fsw_index(redis_url, "forget", selfie, "-g", gallery))
    m = layout.read_manifest(gallery)
    assert m.forgotten and m.format == layout.FORGOTTEN_FORMAT
    added = {p.name for p in gallery.iterdir()} - before
    assert added == {m.forgotten}  # no copy of the selfie, nothing else
    path = gallery / m.forgotten
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    (kept,) = doc["forgotten"]
    assert set(kept) == {"id", "created_at", "source", "threshold", "version", "descriptor"}
    assert kept["id"] == entry and len(kept["descriptor"]) == 128
    data = selfie.read_bytes()
    for p in gallery.iterdir():  # neither the selfie's bytes nor its base64 anywhere in the gallery
        content = p.read_bytes()
        assert data[1000:1064] not in content and base64.b64encode(data)[1000:1064] not in content


def test_a_tampered_forgotten_file_is_refused_not_half_used(
    gallery: Path, labels: list[Label], redis_url: str, portal: Any,
) -> None:
    fsw_index(redis_url, "forget", query(labels, ROSE), "-g", gallery)
    path = gallery / str(layout.read_manifest(gallery).forgotten)
    doc = json.loads(path.read_text())
    doc["forgotten"][0]["threshold"] = 0.9  # would hide almost nothing
    path.write_text(json.dumps(doc))
    with pytest.raises(GalleryError, match="does not match the sha256"):
        Gallery.open(gallery)
    assert any("does not match the sha256" in p for p in verify_gallery(gallery))


def test_a_gallery_without_forgotten_faces_is_written_as_before(built_gallery: Path) -> None:
    manifest = json.loads(layout.manifest_path(built_gallery).read_text())
    assert manifest["format"] == layout.FORMAT == 2 and not {"forgotten", "forgotten_sha256"} & set(manifest)
    assert Gallery.open(built_gallery).forgotten == () and not Gallery.open(built_gallery).face_hidden.any()


def test_a_forgotten_file_left_by_a_killed_writer_is_removed_by_the_next(
    gallery: Path, labels: list[Label], redis_url: str, portal: Any,
) -> None:
    fsw_index(redis_url, "forget", query(labels, ROSE), "-g", gallery)
    named = str(layout.read_manifest(gallery).forgotten)
    (gallery / "forgotten-v99.json").write_text("{}")  # written, its manifest never was
    (gallery / ".forgotten-v99.json.4242.tmp").write_text("{")
    settings = layout.read_manifest(gallery).settings
    with GalleryWriter(gallery, settings, command="test"):
        pass
    assert sorted(p.name for p in gallery.glob("*forgotten*")) == [named]
    assert len(Gallery.open(gallery).forgotten) == 1


def test_forgotten_entries_round_trip_exactly() -> None:
    d = np.random.default_rng(0).normal(0, 0.1, 128).astype(np.float32)
    entry = forgotten.make(d, 0.45, "portal")
    (back,) = forgotten.loads(forgotten.dumps([entry]))
    assert (back.id, back.threshold, back.created_at, back.source) == (entry.id, 0.45, entry.created_at, "portal")
    assert np.array_equal(back.descriptor, d)  # float32 values exact through JSON
    for bad in ({"id": "x" * 12, "descriptor": [0.0] * 128, "threshold": 0.45},
                {"id": entry.id, "descriptor": [0.0] * 127, "threshold": 0.45},
                {"id": entry.id, "descriptor": [0.0] * 128, "threshold": 0.05}):
        with pytest.raises(ValueError):
            forgotten.Forgotten.from_dict(bad)


def test_the_portals_forget_job_hides_the_faces_from_every_later_job(
    gallery: Path, labels: list[Label], photo_tree: PhotoTree, tmp_path: Path, redis_url: str, portal: Any,
) -> None:
    """Through Redis and a real `fsw-worker run`: forget-face, then searches; then the fold into the gallery."""
    queue = "forget-e2e"
    worker = start_worker(redis_url, gallery, queue, tmp_path / "worker")
    try:
        rose, kit = photo_tree.photos_of(ROSE), photo_tree.photos_of(KIT)
        (before,) = run_jobs(redis_url, queue, [selfie_job(query(labels, ROSE))])
        assert set(before.photo_ids) == rose

        forget_job = selfie_job(query(labels, ROSE))
        outcome = asyncio.run(_forget_job(redis_url, queue, forget_job))
        assert outcome.state == "completed", outcome.failed_reason
        assert outcome.result["faces_hidden"] == 2
        entry = outcome.result["id"]
        assert portal.hkeys(FORGOTTEN_HASH) == [entry]
        _assert_no_selfie_in_redis(portal, forget_job["image"])

        after_rose, after_kit = run_jobs(redis_url, queue, [selfie_job(query(labels, ROSE)),
                                                            selfie_job(query(labels, KIT))])
        assert after_rose.photo_ids == []
        assert set(after_kit.photo_ids) == kit  # the group photo still comes back for Kit

        # the one writer takes the entry into the gallery; Redis lets it go once the worker serves that version
        taken, version, left = forgetting.fold(gallery, portal, wait_s=60)
        assert taken == [entry] and left == [] and portal.hkeys(FORGOTTEN_HASH) == []
        assert worker.record()["gallery_version"] == version  # type: ignore[index]
        assert [e.id for e in Gallery.open(gallery).forgotten] == [entry]
        (folded,) = run_jobs(redis_url, queue, [selfie_job(query(labels, ROSE))])
        assert folded.photo_ids == []

        undone = fsw_index(redis_url, "forget", "--undo", entry, "-g", gallery)
        assert undone.exit_code == 0, undone.output
        worker.wait_record(lambda rec: rec["gallery_version"] == version + 1)
        (back,) = run_jobs(redis_url, queue, [selfie_job(query(labels, ROSE))])
        assert set(back.photo_ids) == rose
    finally:
        assert worker.stop() == 0


def test_undo_of_a_portal_forget_not_yet_folded_takes_it_out_of_redis(
    gallery: Path, labels: list[Label], encoder: Encoder, redis_url: str, portal: redis.Redis,
) -> None:
    from matcher.query import selfie_descriptor

    entry = forgotten.make(selfie_descriptor(encoder, query(labels, ROSE)), source="portal")
    portal.hset(FORGOTTEN_HASH, entry.id, json.dumps(entry.to_dict()))
    listed = fsw_index(redis_url, "forget", "--list", "-g", gallery).output
    assert entry.id in listed and "Redis" in listed and "2 faces hidden" in listed
    assert fsw_index(redis_url, "forget", "--undo", entry.id, "-g", gallery).exit_code == 0
    assert portal.hkeys(FORGOTTEN_HASH) == []


async def _forget_job(redis_url: str, queue: str, data: dict[str, Any]) -> Any:
    q = Queue(queue, {"connection": redis_url})
    try:
        job = await q.add(FORGET_JOB, data, dict(JOB_OPTIONS))
        return await wait_job(q, str(job.id), 120, poll_s=0.05)
    finally:
        await q.close()


def _assert_no_selfie_in_redis(client: redis.Redis, image: str) -> None:
    """No key of any type holds a piece of the selfie's base64 (the forget job's record included)."""
    piece = image[-200:-100]
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        values: list[str] = []
        if kind == "string":
            values = [client.get(key) or ""]
        elif kind == "hash":
            values = list(client.hvals(key))
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "stream":
            values = [json.dumps(e) for e in client.xrange(key)]
        assert not any(piece in v for v in values), f"{key} holds the selfie"


def _face_nearest(g: Gallery, encoder: Encoder, selfie: Path, photo_id: str) -> int:
    """The face row of `photo_id` closest to the selfie's face: the one an operator would have cut out."""
    from matcher.query import selfie_descriptor

    photo = int(np.flatnonzero(g.photo_ids == photo_id)[0])
    rows = np.flatnonzero(g.face_photo == photo)
    d = np.linalg.norm(g.vectors[rows] - selfie_descriptor(encoder, selfie), axis=1)
    return int(rows[np.argmin(d)])
