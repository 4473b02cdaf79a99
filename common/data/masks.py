"""Resizing images and building masks at a target resolution, on one pixel-centre convention.

Convention: the source image of ``columns`` x ``rows`` pixels is resized to ``size`` x
``size``, so x scales by ``size / columns`` and y by ``size / rows`` (a non-square image
is stretched, never cropped). A target pixel (r, c) belongs to a box mask when its centre
``(c + 0.5, r + 0.5)`` lies in the scaled half-open box ``[x0, x1) x [y0, y1)``, and to a
resampled mask when the source pixel holding that centre is set. At full resolution an
integer box of width w and height h therefore covers exactly w * h pixels, and a union of
boxes covers exactly its area. Boxes are clipped to the image first.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from PIL import Image

from common.data.records import Box


def scale_box(box: Box, *, rows: int, columns: int, size: int) -> tuple[float, float, float, float]:
    """Return ``(x0, y0, x1, y1)`` of ``box`` in the pixels of the ``size`` x ``size`` image."""
    sx, sy = size / columns, size / rows
    return box.x * sx, box.y * sy, (box.x + box.width) * sx, (box.y + box.height) * sy


def box_mask(boxes: Iterable[Box], *, rows: int, columns: int, size: int) -> np.ndarray:
    """Return the uint8 0/1 union of the filled ``boxes`` at ``size`` x ``size``.

    ``rows`` and ``columns`` are the source image's height and width, in which the boxes
    are given. See the module docstring for the pixel-centre convention.
    """
    _check_size(size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = scale_box(box, rows=rows, columns=columns, size=size)
        c0, c1 = pixel_span(x0, x1, size)
        r0, r1 = pixel_span(y0, y1, size)
        mask[r0:r1, c0:c1] = 1
    return mask


def resample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Return a 0/1 ``mask`` resampled to ``size`` x ``size`` by pixel-centre lookup.

    Target pixel (r, c) takes source pixel ``(floor((r + 0.5) * rows / size),
    floor((c + 0.5) * columns / size))``, the pixel holding its centre.
    """
    _check_size(size)
    rows, columns = mask.shape
    row_index = np.floor((np.arange(size) + 0.5) * rows / size).astype(np.int64)
    column_index = np.floor((np.arange(size) + 0.5) * columns / size).astype(np.int64)
    return mask[np.ix_(row_index, column_index)].astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Return a float32 [0, 1] ``image`` resized to ``size`` x ``size``.

    Shrinking both axes averages the source area under each target pixel (Pillow's BOX
    filter); otherwise Pillow's BILINEAR filter interpolates (and low-pass filters any axis
    that shrinks). Pillow maps pixel centres as :func:`box_mask` does, so image and mask
    stay aligned.
    """
    _check_size(size)
    rows, columns = image.shape
    if (rows, columns) == (size, size):
        return image.astype(np.float32, copy=False)
    shrink = size <= rows and size <= columns
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    resized = Image.fromarray(image.astype(np.float32, copy=False)).resize((size, size), method)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def pixel_span(low: float, high: float, size: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of the pixels whose centres lie in ``[low, high)``, clipped.

    Pixel ``c`` is inside when ``low <= c + 0.5 < high``, i.e.
    ``ceil(low - 0.5) <= c < ceil(high - 0.5)``; both ends are clipped to ``[0, size]``.
    """
    start = min(max(math.ceil(low - 0.5), 0), size)
    stop = min(max(math.ceil(high - 0.5), 0), size)
    return start, max(start, stop)


def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"target size must be a positive number of pixels; got {size}")
