"""Which files are images (the suffixes that dataset folders and prediction inputs list), the
images of a folder, and how a photograph is turned to be seen as viewers show it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from fcnseg.errors import UserError

#: lower-case suffixes of the formats OpenCV and Pillow both decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

# EXIF orientation -> the transposition that shows the stored pixels upright, as
# PIL.ImageOps.exif_transpose applies it (2-8; 1 and missing: as stored).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: str | Path | Image.Image) -> int:
    """The orientation tag (1-8) of an image file (read from its header alone) or of an opened
    PIL image; 1 where there is none, or where the EXIF block cannot be parsed (viewers then
    show the pixels as stored)."""
    try:
        if isinstance(image, Image.Image):
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        else:
            with Image.open(image) as opened:
                orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow's EXIF parser raises assorted types on a damaged block
        return 1
    return orientation if orientation in _UPRIGHT else 1


def as_shown(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` (H, W[, C]) as stored, turned as a viewer shows them for EXIF ``orientation``
    (``PIL.ImageOps.exif_transpose``'s turn): 5-8 swap the width and height."""
    method = _UPRIGHT.get(orientation)
    if method is None:
        return pixels
    return np.asarray(Image.fromarray(pixels).transpose(method))


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the images below it (recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"input {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
