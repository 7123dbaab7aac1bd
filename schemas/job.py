"""The portal's face-search job and its result: the contract between the portal and fsw-worker.

The portal (Node.js BullMQ) puts a job named `process-face` on the queue `face-search` with data
`{image, uid, stage, timestamp}` (fsw also reads optional `threshold` and `limit`); the worker returns
an array of `{id, similarity, box}`, best first. `parse_job` turns any bad job data into one
`JobDataError` whose message names the field and the fix, and never quotes the selfie.
`json_schema()` of each model gives the same contract to the Node side.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

QUEUE = "face-search"
JOB_NAME = "process-face"
# job.updateProgress at each stage of a job, in this order
PROGRESS = {"decoded": 25, "face_found": 50, "encoded": 75, "searched": 100}

# The portal's images are phone selfies; 20 MB of base64 (15 MB of JPEG) is far above any of them and
# low enough that a runaway upload is refused before it is decoded.
MAX_IMAGE_CHARS = 20 * 1024 * 1024
# A stage is a folder path; far longer than any real one, and short enough that a message may quote it.
MAX_STAGE_CHARS = 1024
# The matching rule's default and bounds; matcher.defaults imports these, so they are written once.
DEFAULT_THRESHOLD = 0.5
MIN_THRESHOLD, MAX_THRESHOLD = 0.2, 0.9

_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,")
_HEADER_CHARS = 100  # a data URL's header is short; more than this is not a header
# A stage is a folder relative to the photo tree's root: no absolute path, no '.' or '..' segment, no
# backslash or NUL. The same rule for Node, as a JavaScript-compatible pattern (tested against the
# Python check below).
STAGE_PATTERN = r"^(?!/)(?!.*(?:^|/)\.{1,2}(?:/|$))[^\\\x00]*$"


class JobDataError(ValueError):
    """Job data that cannot be a face search: the message says which field and how to fix it."""


def stage_problem(stage: str) -> str | None:
    """Why `stage` cannot name a folder inside the gallery, or None when its shape is fine."""
    parts = stage.strip("/").split("/")
    if stage.startswith("/") or "\\" in stage or "\x00" in stage or any(p in (".", "..") for p in parts):
        shown = repr(stage) if len(stage) <= 80 else f"{stage[:60]!r}... ({len(stage)} characters)"
        return f"stage {shown} must be a folder inside the gallery, like 'Day-1/Morning'"
    return None


class FaceSearchJob(BaseModel):
    """The data of one `process-face` job, as the portal sends it."""

    model_config = ConfigDict(extra="ignore", frozen=True, title="FaceSearchJob")

    image: str = Field(
        description="The selfie: a data:image/...;base64, URL (the portal's format) or bare base64.",
        max_length=MAX_IMAGE_CHARS,
        min_length=1,
    )
    uid: str | int | None = Field(None, description="The portal's user id (e.g. an email); not used in the search.")
    stage: Annotated[str, Field(json_schema_extra={"pattern": STAGE_PATTERN})] = Field(
        "",
        max_length=MAX_STAGE_CHARS,
        description="Folder of the photo tree to search, relative to its root, e.g. 'Day-1/Morning'; "
        "'' searches the whole gallery. '..' and absolute paths are refused.",
    )
    timestamp: int | float | None = Field(None, description="When the portal queued the job (ms since epoch).")
    threshold: float = Field(
        DEFAULT_THRESHOLD,
        ge=MIN_THRESHOLD,
        le=MAX_THRESHOLD,
        description="fsw: similarity a match must exceed (similarity = 1 - distance).",
    )
    limit: int | None = Field(None, ge=1, description="fsw: at most this many photos.")

    @field_validator("image", mode="before")
    @classmethod
    def _image_text(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("is missing: send the selfie as a data:image/jpeg;base64,... URL")
        if not isinstance(value, str):
            raise ValueError(
                f"must be text (a data:image/jpeg;base64,... URL), not {_json_type(value)}"
            )
        if not value.strip():
            raise ValueError("is empty: send the selfie as a data:image/jpeg;base64,... URL")
        if len(value) > MAX_IMAGE_CHARS:
            raise ValueError(
                f"is too large: {len(value) / 2**20:.1f} MB of base64, over the {MAX_IMAGE_CHARS // 2**20} MB "
                "limit: send a smaller photo (a selfie needs no more than a few megapixels)"
            )
        if value.startswith("data:") and not _DATA_URL.match(value, 0, _HEADER_CHARS):
            header = value[: min(value.find(","), 40)] if "," in value[:_HEADER_CHARS] else value[:20] + "..."
            raise ValueError(f"is a data URL but not data:image/...;base64, (it starts {header!r})")
        return value

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_folder(cls, value: Any) -> Any:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"must be text, a folder like 'Day-1/Morning', not {_json_type(value)}")
        if len(value) > MAX_STAGE_CHARS:
            raise ValueError(
                f"is too long: {len(value)} characters, over the limit of {MAX_STAGE_CHARS}: "
                "name a folder of the photo tree, like 'Day-1/Morning'"
            )
        problem = stage_problem(value.strip())
        if problem:
            raise ValueError(problem)
        return value.strip().strip("/")

    @field_validator("threshold", "limit", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @property
    def media_type(self) -> str | None:
        """The data URL's media type ('image/jpeg'), or None for bare base64."""
        m = _DATA_URL.match(self.image, 0, _HEADER_CHARS)
        return m.group(1) if m else None

    def image_bytes(self) -> bytes:
        """The selfie's bytes, decoded from the data URL or bare base64. Raises JobDataError."""
        m = _DATA_URL.match(self.image, 0, _HEADER_CHARS)
        text = self.image[m.end() :] if m else self.image
        if any(c in text for c in " \n\r\t"):  # some encoders wrap base64 at 76 columns
            text = "".join(text.split())
        text += "=" * (-len(text) % 4) if len(text) % 4 != 1 else ""
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError) as e:
            raise JobDataError(
                f"image is not valid base64 ({e}): send the selfie as a data:image/jpeg;base64,... URL"
            ) from None
        if not data:
            raise JobDataError("image is empty once decoded: send the selfie as a data:image/jpeg;base64,... URL")
        return data

    @classmethod
    def for_image(cls, data: bytes, media_type: str = "image/jpeg", **fields: Any) -> FaceSearchJob:
        """A job for an image's bytes, in the portal's format (a data URL)."""
        return parse_job({**fields, "image": data_url(data, media_type)})


def data_url(data: bytes, media_type: str = "image/jpeg") -> str:
    """An image's bytes as the portal sends them in `image`: `data:<media type>;base64,<bytes>`."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


class MatchEntry(BaseModel):
    """One photo in a result: its id (path in the photo tree), its best face's similarity and box."""

    model_config = ConfigDict(frozen=True, title="MatchEntry")

    id: str = Field(description="The photo's path relative to the photo tree's root, '/' separators.")
    similarity: float = Field(ge=0.0, le=1.0, description="1 - distance of the photo's closest face.")
    box: tuple[int, int, int, int] = Field(description="That face's box in the photo: [top, right, bottom, left].")


class SearchResult(RootModel[list[MatchEntry]]):
    """A job's return value: the matching photos, best first, one entry per photo."""

    model_config = ConfigDict(title="SearchResult")


def dump_result(matches: Iterable[object]) -> list[dict[str, Any]]:
    """A result as the JSON values a job returns and `fsw-index search --json` prints: the one serialiser.

    matches: best first, any objects with `id`, `similarity` and `box` (the matcher's `Match`).
    """
    return SearchResult.model_validate(list(matches), from_attributes=True).model_dump(mode="json")


def parse_job(data: Any) -> FaceSearchJob:
    """The job data as a FaceSearchJob; JobDataError with every problem when it is not one."""
    if not isinstance(data, dict):
        raise JobDataError(f"job data must be a JSON object with an image, not {_json_type(data)}")
    try:
        return FaceSearchJob.model_validate(data)
    except ValidationError as e:
        raise JobDataError(explain(e)) from None


def explain(error: ValidationError) -> str:
    """A ValidationError as one line a person can act on, without quoting the input (a selfie)."""
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in item["loc"]) or "job data"
        kind, ctx = item["type"], item.get("ctx", {})
        if kind == "value_error":  # our validators' messages: "is empty: ...", or a whole sentence
            message = item["msg"].removeprefix("Value error, ")
            lines.append(message if message.startswith(field) else f"{field} {message}")
        elif kind == "missing":
            hint = ": send the selfie as a data:image/jpeg;base64,... URL" if field == "image" else ""
            lines.append(f"{field} is missing{hint}")
        elif field == "threshold" and kind in ("greater_than_equal", "less_than_equal"):
            lines.append(f"threshold must be from {MIN_THRESHOLD} to {MAX_THRESHOLD} (similarity; default 0.5)")
        elif kind in ("greater_than_equal", "less_than_equal"):
            bound = "at least" if kind == "greater_than_equal" else "at most"
            lines.append(f"{field} must be {bound} {ctx.get('ge', ctx.get('le'))}")
        elif kind == "string_too_long" and field == "image":
            lines.append(f"image is too large: over the {MAX_IMAGE_CHARS // 2**20} MB limit: send a smaller photo")
        else:
            lines.append(f"{field}: {item['msg'][:1].lower()}{item['msg'][1:]}")
    return "; ".join(lines)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
