"""Loading photos and selfies into RGB arrays, safely.

Applies the EXIF orientation (phones store photos sideways and set a tag), converts to RGB, and refuses
what is not a usable image with an `ImageError` whose message says why: empty, not an image, an
unsupported format, truncated, or declared dimensions over the pixel limit (a decompression bomb is
refused from its header, before any pixel is decoded). The limit is the caller's, checked on each call:
Pillow's own process-wide guard (`Image.MAX_IMAGE_PIXELS`) is left as it is.

Memory: `load_scaled` decodes no larger than the caller needs (`max_side`, the detector's largest pass):
a JPEG is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg itself (`draft`), other formats are reduced
right after decoding, before the EXIF turn and the RGB conversion copy them; a 40 MP selfie never has a
full-size RGB array (issue 12).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from matcher.defaults import PHOTO_MAX_PIXELS
from matcher.errors import ImageError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_FORMATS = ("JPEG", "PNG", "WEBP", "MPO")

_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


def is_photo(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has one of the photo suffixes fsw indexes (any case)."""
    return str(path).lower().endswith(PHOTO_SUFFIXES)


def load_image(source: str | os.PathLike[str] | bytes, max_pixels: int = PHOTO_MAX_PIXELS) -> np.ndarray:
    """Decode a photo into an RGB uint8 array of shape (height, width, 3), upright, at full size.

    source: a file path or the image's bytes. Raises ImageError for anything that is not a usable
    JPEG, PNG or WebP image, with the reason.
    """
    return load_scaled(source, max_pixels)[0]


def load_scaled(
    source: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int = PHOTO_MAX_PIXELS, max_side: int | None = None
) -> tuple[np.ndarray, float]:
    """`load_image`, decoded no smaller than `max_side` on its long side but no larger than the format
    allows cheaply (None: full size); and the scale, the array's pixels per original pixel (1.0: full
    size). A box found on the array is in original pixels once divided by the scale."""
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("empty file (0 bytes)")
        stream: BinaryIO | Path = io.BytesIO(source)
    elif isinstance(source, io.IOBase):  # a file opened by the caller (`matcher.files.open_photo`)
        if os.fstat(source.fileno()).st_size == 0:
            raise ImageError("empty file (0 bytes)")
        stream = source  # type: ignore[assignment]
    else:
        stream = Path(source)
        try:
            if stream.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        except OSError as e:
            raise ImageError(f"cannot read file: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: our limit is the one that counts
            with Image.open(stream) as img:
                if img.format not in _FORMATS:
                    raise ImageError(f"unsupported image format {img.format}: use JPEG, PNG or WebP")
                width, height = img.size
                _check_pixels(width, height, max_pixels)
                if width < 1 or height < 1:
                    raise ImageError(f"image has no pixels ({width}x{height})")
                factor = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
                if factor < 1.0:  # libjpeg decodes at 1/2, 1/4 or 1/8, no smaller than asked
                    img.draft(img.mode, (math.ceil(width * factor), math.ceil(height * factor)))
                img.load()
                reduced: Image.Image = img
                if factor < 1.0 and img.size == (width, height):  # not a JPEG: reduce before the copies
                    step = int(max(width, height) // max_side)  # type: ignore[operator]
                    if step >= 2:
                        reduced = img.reduce(step)
                scale = reduced.size[0] / width
                upright = ImageOps.exif_transpose(reduced)
                return np.asarray(upright.convert("RGB")), scale
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's fixed guard, far above ours, refused it first
        raise ImageError(_too_large(_declared_size(source, stream), e, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised content)") from None
    except PermissionError as e:
        raise ImageError(f"cannot read file: {e.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        if "truncated" in message.lower():
            message = "image file is truncated"
        raise ImageError(f"corrupt image: {message}") from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels, over the limit of {max_pixels:,}")


def _declared_size(source: object, stream: BinaryIO | Path) -> tuple[int, int] | None:
    """The dimensions the header declares, read by Pillow's format plugin without `Image.open`'s process-wide
    guard (for the message: the size a person can act on)."""
    try:
        if isinstance(source, bytes | bytearray):
            opened: BinaryIO = io.BytesIO(source)
        elif isinstance(stream, Path):
            opened = open(stream, "rb")  # noqa: SIM115 - closed by the `with` below
        else:
            opened = os.fdopen(os.dup(stream.fileno()), "rb")  # the caller's file stays open
        with opened as fp:
            fp.seek(0)
            prefix = fp.read(16)
            for name in _FORMATS:
                factory, accept = Image.OPEN.get(name, (None, None))
                if factory is None or (accept is not None and not accept(prefix)):
                    continue
                fp.seek(0)
                return factory(fp, "").size  # type: ignore[misc]
    except Exception:  # only a message depends on it
        return None
    return None


def _too_large(size: tuple[int, int] | None, error: Exception, max_pixels: int) -> str:
    if size is not None:
        return f"image too large: {size[0]}x{size[1]} pixels, over the limit of {max_pixels:,}"
    found = _BOMB_SIZE.search(str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"image too large: {pixels}, over the limit of {max_pixels:,}"
