"""Loading photos and selfies into RGB arrays, safely.

Applies the EXIF orientation (phones store photos sideways and set a tag), converts to RGB, and refuses
what is not a usable image with an `ImageError` whose message says why: empty, not an image, an
unsupported format, truncated, or declared dimensions over the pixel limit (a decompression bomb is
refused from its header, before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from matcher.defaults import PHOTO_MAX_PIXELS
from matcher.errors import ImageError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_FORMATS = ("JPEG", "PNG", "WEBP", "MPO")

# Pillow's own bomb check warns or raises at its fixed limit; ours is explicit and configurable.
Image.MAX_IMAGE_PIXELS = None


def is_photo(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has one of the photo suffixes fsw indexes (any case)."""
    return str(path).lower().endswith(PHOTO_SUFFIXES)


def load_image(source: str | os.PathLike[str] | bytes, max_pixels: int = PHOTO_MAX_PIXELS) -> np.ndarray:
    """Decode a photo into an RGB uint8 array of shape (height, width, 3), upright.

    source: a file path or the image's bytes. Raises ImageError for anything that is not a usable
    JPEG, PNG or WebP image, with the reason.
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("empty file (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        try:
            if stream.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        except OSError as e:
            raise ImageError(f"cannot read file: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(stream) as img:
                if img.format not in _FORMATS:
                    raise ImageError(f"unsupported image format {img.format}: use JPEG, PNG or WebP")
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"image too large: {width}x{height} pixels, over the limit of {max_pixels:,}"
                    )
                if width < 1 or height < 1:
                    raise ImageError(f"image has no pixels ({width}x{height})")
                img.load()
                upright = ImageOps.exif_transpose(img)
                return np.asarray(upright.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except PermissionError as e:
        raise ImageError(f"cannot read file: {e.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        if "truncated" in message.lower():
            message = "image file is truncated"
        raise ImageError(f"corrupt image: {message}") from None
    except Image.DecompressionBombError as e:  # pragma: no cover - MAX_IMAGE_PIXELS is off
        raise ImageError(f"image too large: {e}") from None
