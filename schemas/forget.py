"""Forgetting a face through the portal: the `forget-face` job, its result, and the Redis hash it fills.

The portal puts a job named `forget-face` on the face-search queue with the same data as a search
(`image`, the selfie of the person to forget; optional `threshold`, the similarity above which a face
counts as theirs); a worker answers `{"id", "faces_hidden"}`. The worker stores the selfie's descriptor
(never the selfie) in the Redis hash `forgotten_faces` (id -> JSON entry, `matcher.forgotten`'s format),
which every worker applies to every search until `fsw-index forget --from-redis` has moved it into the
gallery. docs/security.md says what is stored, where and for how long.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORGET_JOB = "forget-face"
FORGOTTEN_HASH = "forgotten_faces"  # Redis hash: forgotten entry id -> its JSON entry


class ForgetResult(BaseModel):
    """A `forget-face` job's return value."""

    model_config = ConfigDict(frozen=True, title="ForgetResult")

    id: str = Field(description="The forgotten entry's id: give it to `fsw-index forget --undo ID` to undo.")
    faces_hidden: int = Field(ge=0, description="Faces of the gallery in use that the entry hides now.")


def dump_forget_result(entry_id: str, faces_hidden: int) -> dict[str, Any]:
    """A `forget-face` job's result as the JSON value it returns."""
    return ForgetResult(id=entry_id, faces_hidden=faces_hidden).model_dump(mode="json")
