"""Loading photos: orientation, and a clear reason for everything that is not a usable image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from matcher.errors import ImageError
from matcher.images import is_photo, load_image
from testkit.images import encoded, png_bomb, sideways_with_exif, truncated_jpeg


def test_exif_orientation_is_applied(faces_dir, tmp_path):
    source = faces_dir / "gallery" / "g05.jpg"
    sideways_with_exif(source, tmp_path / "sideways.jpg")
    upright = load_image(source)
    turned = load_image(tmp_path / "sideways.jpg")
    assert turned.shape == upright.shape
    assert np.abs(turned.astype(int) - upright.astype(int)).mean() < 8  # same picture, re-encoded


def test_rgba_and_grey_images_become_rgb():
    assert load_image(encoded(Image.new("RGBA", (10, 7), (1, 2, 3, 0)))).shape == (7, 10, 3)
    assert load_image(encoded(Image.new("L", (5, 4)))).shape == (4, 5, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (png_bomb(), "image too large: 60000x60000 pixels"),
        (encoded(Image.new("RGB", (4, 4)), "BMP"), "unsupported image format BMP"),
    ],
)
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(data)


def test_truncated_jpeg_is_refused(faces_dir):
    with pytest.raises(ImageError, match="truncated"):
        load_image(truncated_jpeg(faces_dir / "gallery" / "g01.jpg"))


def test_pixel_limit_is_a_setting():
    img = encoded(Image.new("RGB", (100, 100)))
    assert load_image(img, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="over the limit of 9,999"):
        load_image(img, max_pixels=9_999)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "nope.jpg")


def test_photo_suffixes_in_any_case():
    assert all(is_photo(n) for n in ("a.jpg", "b.JPEG", "c.Png", "d.webp"))
    assert not any(is_photo(n) for n in ("a.gif", "b.txt", "jpg"))


def test_pillows_pixel_guard_is_left_as_it_is_for_the_process():
    """Issue 12: the limit is checked per call from the header (the caller's `max_pixels`); importing fsw does
    not switch off Pillow's own guard for everything else in the process."""
    import subprocess
    import sys

    code = "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import matcher.query; print(I.MAX_IMAGE_PIXELS == d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    with pytest.raises(ImageError, match="image too large: 60000x60000 pixels, over the limit of 64,000,000"):
        load_image(png_bomb(), max_pixels=64_000_000)  # over Pillow's own bomb limit too: ours is the reason
    with pytest.raises(ImageError, match="image too large: 2000x2000 pixels, over the limit of 3,999,999"):
        load_image(png_bomb(2000, 2000), max_pixels=3_999_999)
