"""Hand-made bad, huge and rotated images: what a photo tree or a selfie upload may hold at its worst."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header declares huge dimensions (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def truncated_jpeg(source: Path) -> bytes:
    data = source.read_bytes()
    return data[: len(data) // 3]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def sideways_with_exif(source: Path, dest: Path) -> None:
    """Store the photo rotated a quarter turn, with the EXIF tag that tells viewers to turn it back."""
    image = Image.open(source).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    image.save(dest, format="JPEG", quality=92, exif=exif.tobytes())


def write_bad_files(folder: Path, good_jpeg: Path) -> dict[str, str]:
    """Every kind of bad input a photo tree can hold; returns file name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(truncated_jpeg(good_jpeg))
    (folder / "text.JPG").write_text("this is a text file named like a photo\n")
    (folder / "bomb.png").write_bytes(png_bomb())
    (folder / "animation.webp").write_bytes(encoded(Image.new("RGB", (8, 8)), "GIF"))
    (folder / "dangling.jpeg").symlink_to(folder / "no-such-file.jpg")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text.JPG": "not an image",
        "bomb.png": "image too large: 60000x60000",
        "animation.webp": "unsupported image format GIF",
        "dangling.jpeg": "cannot read file",
    }
