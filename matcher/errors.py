"""The errors `matcher` raises: one type per kind of problem a person can fix.

The CLI and the worker turn these into one clear line each; their messages name the thing and the fix.
"""


class FswError(Exception):
    """Base of every error fsw reports to a person."""


class ImageError(FswError):
    """A photo or selfie that cannot be used: not an image, truncated, too large, unreadable."""


class NoFaceError(FswError):
    """No face was found where one was needed (a selfie)."""


class GalleryError(FswError):
    """A gallery folder that is missing, not a gallery, or damaged."""


class ManifestError(GalleryError):
    """No readable manifest: `problem` says what is wrong (`fsw-index verify` lists it), the message adds the fix."""

    def __init__(self, problem: str, message: str):
        super().__init__(message)
        self.problem = problem


class GalleryLockedError(GalleryError):
    """Another writer holds the gallery's lock."""


class SettingsMismatchError(GalleryError):
    """Encoder settings differ from the ones the gallery was built with."""


class StageError(FswError):
    """A stage that is not a folder inside the gallery."""


class ModelError(FswError):
    """A model file fsw ships or installs that is missing, unreadable or not the one it was measured with."""
