"""`fsw-index forget`: hide a person's faces from every search; list, undo, and take in the portal's forgets.

- `forget_images`: a selfie, or a folder of face images (the old worker's `exclude_faces/`, as it is):
  each image's face (the largest, as a search takes a selfie's) becomes one forgotten entry in the
  gallery (`matcher.forgotten`), with the forget threshold. Images without a face are reported, not
  guessed at. The images themselves are read and left where they are: nothing of them is kept but the
  descriptor.
- `listing`, `undo`: the entries of the gallery and those of the portal still in Redis.
- `fold`: the portal's forgets (`forget-face` jobs, which workers record in the Redis hash
  `forgotten_faces`, `worker.forget`) move into the gallery, which has one writer: this command. An entry
  leaves Redis once every live worker serves a gallery version that holds it (their heartbeats say
  which), so that no worker stops hiding it in between (`tidy`).

A folder's images get the forget threshold, not the old worker's distance of 0.1 (similarity 0.9): that
rule compared the old encoder's descriptors of the same face crop, and fsw's descriptor of a face cut
from a gallery photo lies 0.09 (median) to 0.29 from that face's own, so 0.1 would have missed about a
third of them (measured on the dev faces, docs/cli.md). `--threshold 0.9` gives the old rule back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from matcher import forgotten, layout
from matcher.defaults import FORGET_THRESHOLD
from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import FswError, ImageError, NoFaceError
from matcher.forgotten import Forgotten
from matcher.gallery import Gallery
from matcher.images import is_photo
from matcher.query import selfie_descriptor
from matcher.search import check_threshold
from matcher.writer import GalleryWriter
from schemas.connection import redis_display, redis_kwargs, redis_url
from schemas.forget import FORGOTTEN_HASH
from schemas.heartbeat import ONLINE_WINDOW_S, WORKERS_HASH

COMMAND = "fsw-index forget"
# How long `--from-redis` waits for the workers to load the version holding the portal's forgets before
# it leaves them in Redis for the next run: workers look for a new version every 2 s and beat at once.
FOLD_WAIT_S = 30.0
_POLL_S = 1.0


@dataclass
class Forgot:
    """What `forget_images` did: the entries made (with the image and the faces they hide now), the
    images skipped with the reason, and the gallery version that holds the entries."""

    made: list[tuple[Forgotten, Path, int]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    version: int = 0


@dataclass(frozen=True)
class Listed:
    """One forgotten entry as `--list` shows it."""

    entry: Forgotten
    where: str  # "gallery" or "redis" (the portal's, not in the gallery yet)
    faces_hidden: int  # live faces of the gallery it hides now


def images_of(target: Path) -> list[Path]:
    """The image itself, or every photo file (jpg, jpeg, png, webp) in a folder and below it, sorted."""
    if target.is_dir():
        found = sorted(p for p in target.rglob("*") if p.is_file() and is_photo(p))
        if not found:
            raise FswError(f"{target} holds no face images (jpg, jpeg, png or webp)")
        return found
    if not target.is_file():
        raise FswError(f"{target} is neither a selfie nor a folder of face images")
    return [target]


def forget_images(
    gallery: Path, target: Path, threshold: float = FORGET_THRESHOLD, engine: str = "onnx",
    cache_dir: str | None = None,
) -> Forgot:
    """Forget the person in the selfie `target`, or each person of a folder of face images.

    A single selfie without a face raises its ImageError or NoFaceError; in a folder such images are
    skipped (returned with the reason) and the others forgotten. FswError when no image gave a face.
    """
    threshold = check_threshold(threshold)
    images = images_of(target)
    g = Gallery.open(gallery)
    encoder = Encoder(EncoderSettings.from_recorded(g.settings, engine=engine, cache_dir=cache_dir))
    source = "folder" if target.is_dir() else "selfie"
    out = Forgot()
    for path in images:
        try:
            descriptor = selfie_descriptor(encoder, path)
        except (ImageError, NoFaceError) as e:
            if source == "selfie":
                raise
            out.skipped.append((path, str(e)))
            continue
        entry = forgotten.make(descriptor, threshold, source)
        out.made.append((entry, path, g.faces_hidden_by(entry)))
    if not out.made:
        raise FswError(f"no face found in any image of {target}: nothing forgotten")
    with GalleryWriter(gallery, g.settings, command=COMMAND) as writer:
        writer.forget([entry for entry, _, _ in out.made])
        out.version = writer.commit().version
    return out


def listing(gallery: Path, portal: redis.Redis | None) -> list[Listed]:
    """The gallery's entries, then the portal's still in Redis (when `portal` is given), oldest first."""
    g = Gallery.open(gallery)
    held = {e.id for e in g.forgotten}
    out = [Listed(e, "gallery", g.faces_hidden_by(e)) for e in g.forgotten]
    if portal is not None:
        waiting = [e for e in redis_entries(portal) if e.id not in held]
        out += [Listed(e, "redis", g.faces_hidden_by(e)) for e in waiting]
    return sorted(out, key=lambda x: x.entry.created_at)


def undo(gallery: Path, ids: list[str], portal: redis.Redis | None) -> tuple[list[str], int]:
    """Remove entries by id from the gallery (a new version, whose file no longer holds them) and from
    Redis. Returns the ids found and the gallery version. FswError naming the ids found nowhere."""
    with GalleryWriter(gallery, layout.read_manifest(gallery).settings, command=COMMAND) as writer:
        in_redis = [i for i in ids if portal is not None and portal.hexists(FORGOTTEN_HASH, i)]
        found = set(writer.unforget(ids)) | set(in_redis)
        missing = [i for i in ids if i not in found]
        if missing:
            raise FswError(f"no forgotten entry {', '.join(missing)}: see `{COMMAND} --list` (nothing undone)")
        version = writer.commit().version
        if in_redis:
            assert portal is not None
            portal.hdel(FORGOTTEN_HASH, *in_redis)
    return ids, version


def fold(gallery: Path, portal: redis.Redis, wait_s: float = FOLD_WAIT_S) -> tuple[list[str], int, list[str]]:
    """Move the portal's forgets from Redis into the gallery; then `tidy`. Returns the ids taken in, the
    gallery version, and the ids still in Redis because a worker has not loaded that version yet."""
    with GalleryWriter(gallery, layout.read_manifest(gallery).settings, command=COMMAND) as writer:
        held = {e.id for e in writer.forgotten}
        new = [e for e in redis_entries(portal) if e.id not in held]
        writer.forget(new)
        manifest = writer.commit()
        entries = writer.forgotten
    return [e.id for e in new], manifest.version, tidy(portal, entries, wait_s)


def tidy(portal: redis.Redis, entries: list[Forgotten], wait_s: float = 0.0) -> list[str]:
    """Delete from Redis the portal's entries that the gallery holds, once every live worker serves a
    version that holds them; waits up to `wait_s` for the workers. Returns the ids left in Redis."""
    version = {e.id: e.version for e in entries}
    deadline = time.monotonic() + wait_s
    while True:
        in_redis = [i for i in portal.hkeys(FORGOTTEN_HASH) if i in version]
        serving = _serving_versions(portal)
        done = [i for i in in_redis if all(v >= version[i] for v in serving)]
        if done:
            portal.hdel(FORGOTTEN_HASH, *done)
        left = [i for i in in_redis if i not in done]
        if not left or time.monotonic() + _POLL_S > deadline:
            return left
        time.sleep(_POLL_S)


def redis_entries(portal: redis.Redis) -> list[Forgotten]:
    """The entries in the Redis hash, oldest first; FswError naming an entry that is not one."""
    out = []
    for key, raw in sorted(portal.hgetall(FORGOTTEN_HASH).items()):
        try:
            out.append(Forgotten.from_dict(json.loads(raw)))
        except ValueError as e:
            raise FswError(f"Redis {FORGOTTEN_HASH} entry {key!r} is not a forgotten entry ({e})") from None
    return sorted(out, key=lambda e: e.created_at)


def _serving_versions(portal: redis.Redis) -> list[int]:
    """The gallery version of each worker whose heartbeat is fresh (a worker without a gallery loads the
    newest when it does, and is left out)."""
    out = []
    for raw in portal.hvals(WORKERS_HASH):
        try:
            beat: dict[str, Any] = json.loads(raw)
            fresh = time.time() - float(beat["last_heartbeat"]) < ONLINE_WINDOW_S and beat.get("status") != "offline"
            if fresh and beat.get("gallery_version") is not None:
                out.append(int(beat["gallery_version"]))
        except (ValueError, TypeError, KeyError):
            continue  # not a heartbeat record: not a worker this concerns
    return out


def portal_redis() -> tuple[redis.Redis, str]:
    """The portal's Redis, as fsw-worker reaches it (REDIS_URL or REDIS_HOST/PORT/PASSWORD, then ./.env),
    and its masked address for messages."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    url = redis_url(os.environ)
    return redis.Redis(**redis_kwargs(url), decode_responses=True), redis_display(url)


def describe(listed: Listed) -> str:
    """One line of `--list`."""
    e = listed.entry
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_at))
    where = f"gallery (version {e.version})" if listed.where == "gallery" else "Redis (the portal's; not folded yet)"
    return (f"{e.id}  {when} UTC  {e.source:<6}  similarity > {e.threshold:.2f}  "
            f"{listed.faces_hidden} face{'' if listed.faces_hidden == 1 else 's'} hidden  {where}")

