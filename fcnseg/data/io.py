"""Reading images and label maps from disk, with errors that name the file, and writing label
maps as palette PNGs.

Images are decoded by OpenCV (the fastest JPEG decoder measured in ``docs/benchmarks.md``),
label maps by Pillow, which returns the class indices of a palette PNG rather than its colours.
EXIF orientation is ignored on both sides: label maps are stored in the sensor's orientation,
and rotating only the photograph would misalign every pixel.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from fcnseg.errors import UserError
from fcnseg.utils.image_files import IMAGE_SUFFIXES
from fcnseg.utils.visualize import Palette, full_palette

__all__ = [
    "IMAGE_SUFFIXES",  # defined in fcnseg.utils.image_files; kept importable from here
    "CorruptFileError",
    "image_size",
    "read_image",
    "read_label",
    "read_mat_label",
    "save_label_png",
]
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class CorruptFileError(UserError):
    """A sample's file is missing or cannot be decoded; ``dataset.skip_corrupt=true`` skips it.

    The constructor takes the message alone as well, so that a DataLoader worker can re-raise it
    in the main process.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptFileError(f"{what} {path} does not exist", path) from None
    except OSError as err:
        raise CorruptFileError(
            f"{what} {path} cannot be read: {err.strerror or err}", path
        ) from None
    if not data:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes)", path)
    return data


def _reason(err: BaseException) -> str:
    """Why a decoder refused the bytes of a file, without the in-memory buffer's repr.

    The decoders read a ``BytesIO`` of the file's bytes and name that object in their
    messages (Pillow: "cannot identify image file <_io.BytesIO object at 0x...>"); the caller
    names the file itself.
    """
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image format Pillow can read"
    return _BUFFER_REPR.sub("the file", str(err))


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as (H, W, 3) uint8 RGB (grey and RGBA images are converted).

    Raises:
        CorruptFileError: the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    data = _read_bytes(path, "image")
    bgr = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    # OpenCV 4 decodes a truncated JPEG into a half-grey image with only a warning; a JPEG
    # whose end marker is missing is decoded again by Pillow, which refuses truncated files.
    truncated = data[:2] == _JPEG_START and _JPEG_END not in data[-4096:]
    if bgr is None or truncated:
        return _read_with_pillow(path, data)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_with_pillow(path: Path, data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptFileError(f"image {path} cannot be decoded ({_reason(err)})", path) from None


def read_label(path: str | Path) -> np.ndarray:
    """The label map at ``path`` as an (H, W) integer array of the values stored in the file.

    Palette PNGs (mode ``P``, as VOC's) give their indices, not their colours; greyscale and
    16-bit PNGs give their values; an RGB file whose three channels are equal is read as grey.

    Raises:
        CorruptFileError: the file is missing, empty, truncated or not an image.
        UserError: the file holds colours rather than class indices.
    """
    path = Path(path)
    data = _read_bytes(path, "label")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            array = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptFileError(f"label {path} cannot be decoded ({_reason(err)})", path) from None
    if array.ndim == 3:
        if mode in ("LA", "PA"):  # the alpha channel carries no class
            return array[..., 0]
        if (array[..., 1:3] == array[..., :1]).all():
            return array[..., 0]
        raise UserError(
            f"label {path} is a colour ({mode}) image; labels must hold one class index per pixel "
            "(a palette or greyscale PNG)"
        )
    if array.dtype == bool:  # mode "1"
        return array.astype(np.uint8)
    return array


def read_mat_label(
    path: str | Path, *, struct: str = "GTcls", field: str = "Segmentation"
) -> np.ndarray:
    """``struct.field`` of a MATLAB file, e.g. SBD's ``GTcls.Segmentation`` class map.

    Raises:
        CorruptFileError: the file is missing or not a MATLAB file holding that field.
    """
    from scipy.io import loadmat  # scipy is slow to import; only SBD needs it

    path = Path(path)
    data = _read_bytes(path, "label")
    try:
        mat = loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        return np.asarray(getattr(mat[struct], field))
    except (KeyError, AttributeError):
        raise CorruptFileError(f"label {path} holds no {struct}.{field}", path) from None
    except Exception as err:  # scipy raises a zoo of types (ValueError, TypeError, OSError...)
        raise CorruptFileError(
            f"label {path} cannot be read as a MATLAB file ({_reason(err)})", path
        ) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image at ``path``, from its header alone (nothing is decoded).

    Raises:
        CorruptFileError: the file is missing or its header is not an image's.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise CorruptFileError(f"image {path} does not exist", path) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(f"image {path} cannot be read ({_reason(err)})", path) from None
    return h, w


def save_label_png(
    labels: torch.Tensor | np.ndarray, path: str | Path, *, colors: Palette | None = None
) -> None:
    """Writes (H, W) class indices in [0, 255] as a palette PNG (W x H pixels).

    The file is lossless at the labels' exact size: a palette ("P" mode) PNG stores the class
    index of every pixel (``read_label`` returns them) and shows the class colours in any image
    viewer.
    """
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels in [{labels.min()}, {labels.max()}] do not fit a palette PNG")
    image = Image.fromarray(labels.astype(np.uint8))  # "L"; a palette makes it "P"
    image.putpalette(full_palette(colors).flatten().tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
