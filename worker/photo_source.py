"""Where a worker reads the photos of an encode job: its own view of the photo tree.

`FSW_PHOTOS` names it: a folder (local, or a network mount) or an http(s):// base URL under which the
portal serves its photos (a photo id is appended, each segment URL-quoted). Unset, the worker reads from
the photo root the indexer names in the job: right for a worker on the indexer's machine or one that
mounts the tree at the same path. `read(photo_id)` returns the photo's bytes or raises `PhotoUnavailable`
with the reason the indexer will report for that photo (a missing file, an HTTP 404, a server slower than
the timeout, a response over the size cap, a page that is not an image); one photo never fails a batch.
Reads run in the worker's encode threads, so a slow server holds a thread, never the event loop.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Protocol
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit

from matcher.errors import ImageError
from matcher.files import open_photo
from worker.defaults import FETCH_TIMEOUT_S, MAX_PHOTO_BYTES

_CHUNK = 1 << 20
_ACCEPTED_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


class PhotoUnavailable(Exception):
    """A photo this worker cannot read; the message is the reason, reported for the photo."""


class PhotoSource(Protocol):
    def read(self, photo_id: str) -> bytes: ...

    def describe(self) -> str: ...

    def available(self) -> str | None: ...


class FolderSource:
    """Photos under a folder: `root / photo_id`."""

    def __init__(self, root: Path, max_bytes: int = MAX_PHOTO_BYTES):
        self.root = root
        self.max_bytes = max_bytes

    def describe(self) -> str:
        return str(self.root)

    def available(self) -> str | None:
        """Why this worker cannot read the tree at all (then it refuses the job), or None."""
        if not self.root.is_dir():
            return f"the photo tree {self.root} is not a folder on this machine: set FSW_PHOTOS to its path or URL"
        return None

    def read(self, photo_id: str) -> bytes:
        path = self.root / photo_id  # the job's ids are checked to stay inside the tree (schemas.encode)
        try:
            # a regular file whose real path is in the tree, as `fsw-index build` reads it: no link out of
            # the tree, no FIFO or device that blocks or never ends
            with open_photo(path, self.root) as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_bytes:
                    raise PhotoUnavailable(_too_large(size, self.max_bytes))
                return f.read()
        except ImageError as e:
            raise PhotoUnavailable(str(e)) from None
        except OSError as e:
            raise PhotoUnavailable(f"cannot read file: {e.strerror or e}") from None


class HttpSource:
    """Photos served over HTTP(S): `base_url/<quoted photo id>`, fetched with a timeout, a size cap and a type check."""

    def __init__(self, base_url: str, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_PHOTO_BYTES):
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._host = urlsplit(base_url).hostname or base_url  # for messages: no credentials, no path

    def describe(self) -> str:
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def available(self) -> str | None:
        return None  # each photo says for itself (a 404, a timeout)

    def read(self, photo_id: str) -> bytes:
        url = self.base_url + quote(photo_id, safe="/")
        deadline = time.monotonic() + self.timeout_s
        request = urllib.request.Request(url, headers={"User-Agent": "fsw-worker"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except HTTPError as e:
            raise PhotoUnavailable(f"HTTP {e.code} {e.reason} from {self._host}") from None
        except (URLError, OSError) as e:
            raise PhotoUnavailable(self._failed(e)) from None
        with response:
            kind = response.headers.get("Content-Type")
            if kind and not kind.strip().lower().startswith(_ACCEPTED_TYPES):
                raise PhotoUnavailable(f"{self._host} served {kind.split(';')[0]!r}, not an image")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise PhotoUnavailable(_too_large(int(declared), self.max_bytes))
            chunks: list[bytes] = []
            got = 0
            try:
                while chunk := response.read1(_CHUNK):  # whatever has arrived: a trickle cannot outlast the deadline
                    got += len(chunk)
                    if got > self.max_bytes:
                        raise PhotoUnavailable(_too_large(got, self.max_bytes, at_least=True))
                    if time.monotonic() > deadline:
                        raise PhotoUnavailable(
                            f"{self._host} sent {got:,} bytes in {self.timeout_s:g} s: too slow, given up")
                    chunks.append(chunk)
            except (OSError, ValueError) as e:  # timeouts, resets, a truncated chunked body
                raise PhotoUnavailable(self._failed(e)) from None
        return b"".join(chunks)

    def _failed(self, error: BaseException) -> str:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"no answer from {self._host} within {self.timeout_s:g} s"
        return f"cannot fetch from {self._host}: {reason}"


def photo_source(spec: str | None, job_root: str) -> FolderSource | HttpSource:
    """The source `FSW_PHOTOS` names, or the job's photo root when it names none."""
    if spec and spec.startswith(("http://", "https://")):
        return HttpSource(spec)
    return FolderSource(Path(spec or job_root))


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    """`at_least`: `size` is what was read when a body of no declared length ran past the limit."""
    return f"photo too large: {size:,} bytes{' or more' if at_least else ''}, over the limit of {limit:,}"
