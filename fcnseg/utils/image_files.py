"""Which files are images: the suffixes that dataset folders and prediction inputs list."""

from __future__ import annotations

#: lower-case suffixes of the formats OpenCV and Pillow both decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
