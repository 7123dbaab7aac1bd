"""The encode job: `fsw-index build --fleet` asks the fleet's fsw-workers to encode batches of photos.

Queue `fsw-encode` (its own, so that a portal's `face-search` jobs never wait behind a batch), job name
`encode-photos`. The indexer stays the gallery's single writer: it puts batches on the queue, reads each
job's return value once it completes, commits the faces with the same writer as a local build, and only
then removes the job. Job data (`EncodeJob`):

    {"build": "3f2a...", "root": "/srv/photos", "settings": {<the gallery's recorded settings>},
     "photos": [{"id": "Day-1/Morning/IMG_0001.jpg", "sha256": "9c1e...", "size": 2834112}, ...]}

`build` names the indexer run's gallery (its host and folder); the job id is `enc-<build>-<digest of the
settings and the photos>`, so the same batch asked again is the same job: a resumed build finds its
earlier jobs and their results. A worker encodes with exactly `settings` or refuses the job and says why.
Return value (`EncodeResult`): per photo its sha256 and size as the worker read them, and its faces as
`boxes` (int32, n x 4: top, right, bottom, left) and `descriptors` (float32, n x 128), each the base64 of
the little-endian array bytes (683 characters a face), or `skipped` with the reason it has none.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.job import explain, stage_problem

ENCODE_QUEUE = "fsw-encode"
ENCODE_JOB_NAME = "encode-photos"
# A worker that cannot encode a job as asked (other settings, no photo tree) fails it with a reason that
# starts so; the indexer then reports its photos with that reason rather than retry them one by one.
REFUSED = "refused by worker "
# A batch is a few photos (`indexer.defaults`); this bound only refuses a job no indexer would make.
MAX_BATCH = 256
DESCRIPTOR_SIZE = 128
_BOX_DTYPE = np.dtype("<i4")
_DESCRIPTOR_DTYPE = np.dtype("<f4")


class EncodeJobError(ValueError):
    """Encode job data or a result that breaks the contract: the message names the field."""


class EncodePhoto(BaseModel):
    """One photo to encode, as the indexer found it."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="EncodePhoto")

    id: str = Field(min_length=1, max_length=4096,
                    description="The photo's path relative to the photo tree's root, '/' separators.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the file as the indexer read it.")
    size: int = Field(ge=0, description="The file's size in bytes as the indexer read it.")

    @field_validator("id")
    @classmethod
    def _inside_the_tree(cls, value: str) -> str:
        if value.startswith("/") or stage_problem(value) is not None:
            raise ValueError(f"photo id {value[:80]!r} must be a path inside the photo tree, like 'Day-1/IMG_1.jpg'")
        return value


class EncodeJob(BaseModel):
    """The data of one `encode-photos` job."""

    model_config = ConfigDict(extra="ignore", frozen=True, title="EncodeJob")

    build: str = Field(pattern=r"^[0-9a-f]{16}$", description="The indexer run's gallery: `build_key`.")
    root: str = Field("", description="The photo root on the indexer's machine: where a worker without "
                                      "FSW_PHOTOS reads the photos.")
    settings: dict[str, Any] = Field(description="The gallery's recorded encoder settings; a worker encodes with "
                                                 "exactly these or refuses the job.")
    photos: list[EncodePhoto] = Field(min_length=1, max_length=MAX_BATCH)

    @property
    def job_id(self) -> str:
        return encode_job_id(self.build, self.settings, self.photos)


class EncodedPhoto(BaseModel):
    """One photo's outcome: its faces as packed arrays, or why it has none."""

    model_config = ConfigDict(extra="ignore", frozen=True, title="EncodedPhoto")

    id: str
    sha256: str | None = Field(None, description="sha256 of the bytes the worker read; null if it read none.")
    size: int | None = Field(None, description="Size in bytes of what the worker read.")
    faces: int = Field(0, ge=0, description="Faces found: the rows of `boxes` and `descriptors`.")
    boxes: str = Field("", description="base64 of int32 little-endian, faces x 4: top, right, bottom, left.")
    descriptors: str = Field("", description="base64 of float32 little-endian, faces x 128.")
    too_small: int = Field(0, ge=0, description="Faces found but narrower than the settings' min_face: counted, "
                                                "not encoded.")
    skipped: str | None = Field(None, description="Why the photo was not encoded (unreadable, not an image...).")

    @classmethod
    def of(cls, id: str, sha256: str, size: int, boxes: np.ndarray, descriptors: np.ndarray,
           too_small: int = 0) -> EncodedPhoto:
        """A photo's faces, packed: boxes (n, 4) and descriptors (n, 128), stored exactly (no rounding)."""
        b = np.ascontiguousarray(boxes, dtype=_BOX_DTYPE).reshape(-1, 4)
        d = np.ascontiguousarray(descriptors, dtype=_DESCRIPTOR_DTYPE).reshape(-1, DESCRIPTOR_SIZE)
        if len(b) != len(d):
            raise ValueError(f"{id}: {len(b)} boxes but {len(d)} descriptors")
        return cls(id=id, sha256=sha256, size=size, faces=len(b), boxes=_pack(b), descriptors=_pack(d),
                   too_small=too_small)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """boxes int32 (n, 4) and descriptors float32 (n, 128), in this machine's byte order."""
        boxes = _unpack(self.boxes, _BOX_DTYPE, 4, self.faces, f"{self.id}: boxes")
        descriptors = _unpack(self.descriptors, _DESCRIPTOR_DTYPE, DESCRIPTOR_SIZE, self.faces,
                              f"{self.id}: descriptors")
        return boxes.astype(np.int32), descriptors.astype(np.float32)


class EncodeResult(BaseModel):
    """An `encode-photos` job's return value."""

    model_config = ConfigDict(extra="ignore", frozen=True, title="EncodeResult")

    worker: str = Field(description="The worker id that encoded the batch (as in the `workers` hash).")
    photos: list[EncodedPhoto] = Field(description="One entry per photo of the job, in the job's order.")
    seconds: float = Field(0.0, ge=0, description="Time the worker spent on the photos (read, decode, detect, "
                                                  "encode), without the queue's own time.")


def build_key(hostname: str, gallery: str) -> str:
    """The `build` of an indexer's jobs: its host and gallery folder (absolute), so that a re-run of the
    same command finds its own jobs and no other gallery's."""
    return hashlib.sha256(f"{hostname}\0{gallery}".encode()).hexdigest()[:16]


def encode_job_id(build: str, settings: dict[str, Any], photos: list[EncodePhoto]) -> str:
    """`enc-<build>-<digest>`: the same batch with the same settings is the same job (BullMQ adds it once)."""
    canonical = json.dumps({"settings": settings, "photos": [[p.id, p.sha256, p.size] for p in photos]},
                           sort_keys=True, separators=(",", ":"))
    return f"enc-{build}-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def parse_encode_job(data: Any) -> EncodeJob:
    """The job data as an EncodeJob; EncodeJobError naming every problem when it is not one."""
    if not isinstance(data, dict):
        raise EncodeJobError(f"encode job data must be a JSON object, not {type(data).__name__}")
    try:
        return EncodeJob.model_validate(data)
    except ValidationError as e:
        raise EncodeJobError(explain(e)) from None


def parse_encode_result(value: Any) -> EncodeResult:
    """A job's return value as an EncodeResult; EncodeJobError when it is not one (a worker of another version?)."""
    try:
        return EncodeResult.model_validate(value)
    except ValidationError as e:
        raise EncodeJobError(f"encode result: {explain(e)}") from None


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def _unpack(text: str, dtype: np.dtype, width: int, rows: int, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise EncodeJobError(f"{what}: not base64 ({e})") from None
    if len(raw) != rows * width * dtype.itemsize:
        raise EncodeJobError(f"{what}: {len(raw)} bytes, expected {rows} x {width} x {dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, width)
