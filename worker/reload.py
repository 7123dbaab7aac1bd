"""The gallery a worker serves, picked up again whenever `fsw-index` commits a new version.

`GalleryReloader.current` is the Gallery jobs search. `watch()` polls the manifest's version (a small
file read) every few seconds; a new version is loaded in a background thread while jobs go on with the
old one, then swapped in with one assignment. A job takes `current` once at its start, so no job ever
sees two versions, and none fails because of a reload. A version that fails to load (a malformed
manifest, a damaged file) leaves the previous one serving, and is logged once; without any gallery, jobs
fail with `gallery not loaded: <why>`, and the worker logs that line every `GALLERY_WAITING_LOG_S` until a
valid gallery appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from matcher.errors import GalleryError
from matcher.gallery import Gallery
from matcher.layout import manifest_version
from worker.defaults import GALLERY_WAITING_LOG_S, RELOAD_POLL_S

log = logging.getLogger("fsw.worker")


class GalleryReloader:
    def __init__(
        self,
        folder: Path,
        poll_s: float = RELOAD_POLL_S,
        open_gallery: Callable[[Path], Gallery] | None = None,
        gpu: int | None = None,
        on_gpu_fallback: Callable[[], None] | None = None,
        waiting_log_s: float = GALLERY_WAITING_LOG_S,
    ):
        """gpu: search on that CUDA device where FAISS can (`Gallery.open`); its CPU fallbacks are reported
        to `on_gpu_fallback`. open_gallery: how a version is loaded (a test's), instead of `Gallery.open`.
        waiting_log_s: while no version is loaded, why is logged again this often."""
        self.folder = folder
        self.poll_s = poll_s
        self.current: Gallery | None = None
        self.error: str | None = None
        self.changed = asyncio.Event()  # set at each swap (and new error), for an early heartbeat
        self._open = open_gallery or partial(Gallery.open, gpu=gpu, on_gpu_fallback=on_gpu_fallback)
        self.waiting_log_s = waiting_log_s
        self._logged_at = -waiting_log_s

    def require(self) -> Gallery:
        """The gallery to search; GalleryError with the reason when none is loaded."""
        gallery = self.current
        if gallery is None:
            raise GalleryError(f"gallery not loaded: {self.error or f'nothing at {self.folder} yet'}")
        return gallery

    async def refresh(self) -> bool:
        """Load the committed version if it is not the one in use. True when a new one was swapped in."""
        version = await asyncio.to_thread(manifest_version, self.folder)
        current = self.current
        if current is not None and version == current.version:
            if self.error is not None:  # the manifest that failed was put back
                self.error = None
                self.changed.set()
            return False
        try:
            gallery = await asyncio.to_thread(self._open, self.folder)
        except Exception as e:  # a malformed manifest, a damaged file: the previous version goes on serving
            self._set_error(str(e) if isinstance(e, GalleryError | OSError) else f"{type(e).__name__}: {e}")
            return False
        self.current = gallery
        self.error = None
        self.changed.set()
        log.info(
            "gallery version %s loaded from %s: %s photos, %s faces%s",
            gallery.version, self.folder, gallery.photo_count, gallery.face_count,
            f" (was version {current.version})" if current else "",
        )
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Refresh every `poll_s` seconds until `stop` is set."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as e:  # never let a reload problem end the watch
                self._set_error(f"{type(e).__name__}: {e}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)

    def _set_error(self, message: str) -> None:
        """Log why a version did not load: once while a previous one serves, every `waiting_log_s` while
        none does (jobs fail meanwhile, and the log says why)."""
        now = time.monotonic()
        waiting = self.current is None and now - self._logged_at >= self.waiting_log_s
        if message != self.error or waiting:
            serving = (f"; still serving version {self.current.version}" if self.current
                       else "; waiting for a valid gallery, jobs fail meanwhile")
            log.warning("gallery at %s not loaded: %s%s", self.folder, message, serving)
            self._logged_at = now
            if message != self.error:
                self.changed.set()
        self.error = message
