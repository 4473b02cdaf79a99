"""Reading one image (DICOM, PNG or JPEG) or one mask (PNG) from the folder layout.

Every reader returns float32 pixels in [0, 1] (images) or a uint8 0/1 array (masks), and
raises :class:`common.data.dicom.ImageReadError` naming the file when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data.dicom import ImageReadError, decode_pixels, dicom_metadata, read_dicom
from common.data.records import Metadata
from common.data.report import LoadReport

IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")
"""File endings read as images, in order of preference."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow modes of 16-bit grayscale PNGs (Pillow opens some as 32-bit "I")."""

MASK_LEVELS = ((0, 1), (0, 255))
"""Value pairs a mask may use: 0/1 or 0/255."""


@dataclass(frozen=True)
class MaskRead:
    """A mask as 0/1 and whether its values needed thresholding."""

    mask: np.ndarray
    thresholded: bool
    values: tuple[int, ...]


def is_dicom(path: Path) -> bool:
    """Return whether ``path`` is read as DICOM (by its ending)."""
    return path.suffix.lower() == ".dcm"


def image_metadata(path: Path) -> Metadata:
    """Open ``path`` without decoding its pixels and return its size and header fields."""
    if is_dicom(path):
        return dicom_metadata(read_dicom(path))
    try:
        with Image.open(path) as image:
            image.verify()
            width, height = image.size
            bits = 16 if image.mode in _SIXTEEN_BIT_MODES else 8
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        # Pillow's verify() raises SyntaxError for a broken PNG chunk.
        raise ImageReadError("unreadable_file", path, f"cannot read image ({error})") from None
    return Metadata(rows=height, columns=width, bits_stored=bits)


def check_image(path: Path, *, decode: bool, report: LoadReport) -> Metadata | None:
    """Return ``path``'s metadata after checking it opens (and decodes, with ``decode``).

    A failure is added to ``report`` under its issue kind and gives None.
    """
    try:
        metadata = image_metadata(path)
        if decode:
            read_image(path)
    except ImageReadError as error:
        report.add(error.kind, str(error.path), error.reason)
        return None
    finally:
        report.images_checked += 1
    return metadata


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` to float32 [H, W] in [0, 1]; colour becomes gray (ITU-R 601 luma).

    8-bit images are divided by 255 and 16-bit ones by 65535. Alpha is dropped, not
    composited: chest X-ray PNGs carry an opaque alpha channel if any.
    """
    if is_dicom(path):
        return decode_pixels(read_dicom(path), path)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_unit(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ImageReadError("unreadable_file", path, f"cannot decode image ({error})") from None


def read_mask(path: Path) -> MaskRead:
    """Read a mask PNG as uint8 0/1.

    Values 0/1 and 0/255 are read as they are; any other values are thresholded at half
    the range their maximum implies (0.5, 127.5 or 32767.5) and flagged ``thresholded``.
    Colour masks are turned gray first.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("1", "L", "P") + _SIXTEEN_BIT_MODES:
                image = image.convert("L")
            values = np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ImageReadError("bad_mask", path, f"cannot read mask ({error})") from None
    if values.ndim != 2:
        raise ImageReadError("bad_mask", path, f"mask has shape {values.shape}; 2-D expected")
    present = tuple(int(v) for v in np.unique(values))
    if values.dtype == bool:
        return MaskRead(values.astype(np.uint8), False, present)
    standard = any(set(present) <= set(levels) for levels in MASK_LEVELS)
    top = max(present) if present else 0
    full_scale = 65535
    if top <= 1:
        full_scale = 1
    elif top <= 255:
        full_scale = 255
    return MaskRead((values > full_scale / 2).astype(np.uint8), not standard, present)


def _to_unit(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
    elif image.mode == "1":
        values = np.asarray(image, dtype=np.float64)
    else:
        values = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    return np.clip(values, 0.0, 1.0).astype(np.float32)
