"""The portal's forgets in a worker: `forget-face` jobs recorded in Redis, and applied to every search.

A worker never writes the gallery (`fsw-index` is its one writer). For a `forget-face` job (the selfie of
a person who asked to be forgotten, `schemas.forget`) the worker makes the selfie's descriptor as a
search does, stores it as a forgotten entry (`matcher.forgotten`: the descriptor, a threshold, a random
id; not the selfie) in the Redis hash `forgotten_faces`, and answers the entry's id. The job's selfie
leaves Redis as every job's does (`worker.selfies`).

Every search job first reads the hash's ids (one HKEYS). The entries the gallery in use does not hold
yet are fetched once, and the job searches a view of the gallery that hides their faces too
(`Gallery.hiding`), made once per gallery version and set of entries. So a forget is in force for every
job that any worker starts after the forget job ended, without a gallery write. `fsw-index forget
--from-redis` moves the entries into the gallery, and deletes them from Redis once every live worker
serves a gallery version that holds them (`indexer.forget`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Executor
from typing import Any

from redis.asyncio import Redis

from matcher import forgotten
from matcher.defaults import FORGET_THRESHOLD
from matcher.encoder import Encoder
from matcher.forgotten import Forgotten
from matcher.gallery import Gallery
from matcher.query import selfie_descriptor
from schemas import parse_job
from schemas.forget import FORGOTTEN_HASH

log = logging.getLogger("fsw.worker")


class PortalForgets:
    """The forgotten entries in Redis, for one worker: `apply` them to a gallery, `record` a new one."""

    def __init__(self, redis: Redis, executor: Executor | None = None):
        self.redis = redis
        self.executor = executor  # where a view's scans run (None: the loop's default executor)
        self._entries: dict[str, Forgotten] = {}  # fetched from Redis, by id
        self._unusable: set[str] = set()  # ids whose Redis value is not an entry (logged once)
        self._view: tuple[Gallery, frozenset[str], Gallery] | None = None  # gallery, entry ids, its view
        self._lock = asyncio.Lock()

    async def apply(self, gallery: Gallery) -> Gallery:
        """`gallery`, or a view of it that also hides the faces of the portal's entries it does not hold."""
        ids = set(await self.redis.hkeys(FORGOTTEN_HASH))
        pending = frozenset(ids - {e.id for e in gallery.forgotten} - self._unusable)
        if not pending:
            return gallery
        async with self._lock:  # concurrent jobs make one view, not one each
            if self._view is not None and self._view[0] is gallery and self._view[1] == pending:
                return self._view[2]
            await self._fetch(sorted(pending - self._entries.keys()))
            self._entries = {i: e for i, e in self._entries.items() if i in ids}
            entries = [self._entries[i] for i in sorted(pending) if i in self._entries]
            loop = asyncio.get_running_loop()
            view = await loop.run_in_executor(self.executor, gallery.hiding, entries)
            self._view = (gallery, pending, view)
            return view

    async def _fetch(self, ids: list[str]) -> None:
        if not ids:
            return
        for entry_id, raw in zip(ids, await self.redis.hmget(FORGOTTEN_HASH, ids), strict=True):
            if raw is None:
                continue  # undone meanwhile
            try:
                self._entries[entry_id] = Forgotten.from_dict(json.loads(raw))
            except ValueError as e:
                self._unusable.add(entry_id)
                log.warning("%s entry %s is not a forgotten entry (%s): it hides nothing", FORGOTTEN_HASH,
                            entry_id[:40], e)

    @staticmethod
    def entry(data: Any, encoder: Encoder) -> Forgotten:
        """In a pool thread: the entry of a `forget-face` job: its selfie's descriptor, as a search makes it,
        with the job's `threshold` or the forget threshold. Raises JobDataError, ImageError or NoFaceError."""
        request = parse_job(data)
        threshold = request.threshold if "threshold" in request.model_fields_set else FORGET_THRESHOLD
        return forgotten.make(selfie_descriptor(encoder, request.image_bytes()), threshold, "portal")

    async def record(self, entry: Forgotten) -> None:
        """Store the entry in Redis: every worker hides its faces from the next job it starts."""
        await self.redis.hset(FORGOTTEN_HASH, entry.id, json.dumps(entry.to_dict()))
