"""DICOM reading through pydicom: structure checks, header metadata and pixels in [0, 1].

Compressed pixel data is decoded by pydicom's pixel backends: JPEG Baseline/Extended/
Lossless and JPEG-LS through pylibjpeg-libjpeg, JPEG 2000 through pylibjpeg-openjpeg, RLE
through pylibjpeg-rle (or pydicom's own RLE decoder), and uncompressed data natively.

Grey levels are mapped to [0, 1] in the order of the DICOM grayscale pipeline (PS3.3
C.11, "Grayscale Transformations"): Modality LUT (RescaleSlope/RescaleIntercept or a
Modality LUT Sequence), then VOI (a VOI LUT Sequence, else WindowCenter/WindowWidth, else
the whole range the stored bits can hold), then MONOCHROME1 inversion so that dense tissue
is always bright.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import get_expected_length

from common.data.records import Metadata

log = logging.getLogger(__name__)

PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"
"""(7FE0,0010) Pixel Data as it appears in a little-endian file: found in a file whose
parsed dataset has no Pixel Data, it means the element was cut off (a truncated file)."""

JPEG_FAMILY_PREFIX = "1.2.840.10008.1.2.4."
"""Transfer syntax UIDs of JPEG, JPEG-LS and JPEG 2000; their streams end with FFD9."""

END_OF_IMAGE = b"\xff\xd9"
END_MARKER_WINDOW = 8
"""Bytes at the end of the pixel data searched for the end marker: encoders pad the last
fragment to an even length and some add a byte or two after FFD9."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B, used to turn colour images into gray."""

_GRAYSCALE_TRANSFORMS = (
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
)
"""Elements that change the stored-value to grey-level mapping; without them the stored
range maps linearly to [0, 1]."""

_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25, "": 365.25}


class ImageReadError(ValueError):
    """An image file that cannot be used; ``kind`` is the report's issue kind."""

    def __init__(self, kind: str, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.kind = kind
        self.path = Path(path)
        self.reason = reason


def read_dicom(path: Path | str) -> Dataset:
    """Read a DICOM file and check that it contains one 2-D image with complete pixel data.

    Pixels are read as bytes but not decoded (a fraction of a millisecond per RSNA file).
    Raises :class:`ImageReadError` with kind ``unreadable_file`` (not DICOM, truncated),
    ``no_pixel_data`` (no Pixel Data element) or ``unsupported_image`` (multi-frame,
    zero-sized).
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise ImageReadError("unreadable_file", path, f"not a DICOM file ({error})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        # pydicom raises several types for a damaged file; all mean "cannot parse".
        raise ImageReadError("unreadable_file", path, f"cannot parse DICOM ({error})") from None
    _check_pixel_element(ds, path)
    _check_single_image(ds, path)
    _check_complete(ds, path)
    return ds


def dicom_metadata(ds: Dataset) -> Metadata:
    """Return the header fields of ``ds`` used for sites and masks."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return Metadata(
        view_position=_text(ds.get("ViewPosition")),
        patient_sex=_text(ds.get("PatientSex")),
        patient_age=parse_age(ds.get("PatientAge")),
        pixel_spacing=_first_float(spacing),
        modality=_text(ds.get("Modality")),
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        bits_stored=_int_or_none(ds.get("BitsStored")),
    )


def decode_pixels(ds: Dataset, path: Path | str) -> np.ndarray:
    """Decode the image of ``ds`` to float32 [Rows, Columns] in [0, 1], dense tissue bright.

    Colour images (RGB, YBR, PALETTE COLOR) become gray by :data:`LUMA_WEIGHTS`. Raises
    :class:`ImageReadError` (kind ``decode_failed``) when the codec fails.
    """
    try:
        raw = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - codecs raise any type; each means "cannot decode"
        transfer = _transfer_syntax(ds)
        raise ImageReadError(
            "decode_failed", path, f"cannot decode pixel data ({transfer}): {error}"
        ) from None
    if raw.ndim != (3 if _samples(ds) > 1 else 2):
        raise ImageReadError(
            "unsupported_image", path, f"decoded pixel array has shape {raw.shape}, expected 1 frame"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _palette_to_unit(raw, ds)
    if _samples(ds) > 1:
        return _colour_to_unit(raw, ds)
    unit = _monochrome_to_unit(raw, ds, path).astype(np.float32, copy=False)
    if photometric == "MONOCHROME1":
        unit = np.float32(1.0) - unit
    return unit


def decode_dicom(path: Path | str) -> np.ndarray:
    """Read, check and decode one DICOM file (:func:`read_dicom` then :func:`decode_pixels`)."""
    return decode_pixels(read_dicom(path), path)


def parse_age(value: object) -> int | None:
    """Return a DICOM Age String (``043Y``, ``006M``, or a bare ``43``) in whole years.

    Days, weeks and months are converted with 365.25 days a year and rounded down. None
    when the value is empty or not an age string.
    """
    text = _text(value)
    if text is None:
        return None
    match = _AGE_PATTERN.match(text)
    if not match:
        return None
    count, unit = int(match.group(1)), match.group(2).upper()
    return int(count * _DAYS_PER_UNIT[unit] // 365.25)


def parse_spacing(value: object) -> float | None:
    """Return the first number of a PixelSpacing value in millimetres.

    Accepts pydicom's multi-value, ``0.168\\0.168``, ``[0.168, 0.168]`` or ``0.168``;
    None when empty or not a finite number.
    """
    if not isinstance(value, str):
        return _first_float(value)
    parts = re.split(r"[\\,\s]+", value.strip("[] "))
    return _first_float(parts[0]) if parts else None


def linear_window(values: np.ndarray, *, center: float, width: float, function: str) -> np.ndarray:
    """Map ``values`` through a DICOM VOI window to [0, 1].

    PS3.3 C.11.2.1.2.1 (LINEAR, ``width`` >= 1):
    ``y = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)``, a step at ``c - 0.5`` when w = 1.
    C.11.2.1.3.2 (LINEAR_EXACT, ``width`` > 0): ``y = clip((x - c) / w + 0.5, 0, 1)``.
    C.11.2.1.3.1 (SIGMOID, ``width`` > 0): ``y = 1 / (1 + exp(-4 (x - c) / w))``.
    """
    x = np.asarray(values, dtype=np.float64)
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _check_pixel_element(ds: Dataset, path: Path) -> None:
    if any(name in ds for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return
    if PIXEL_DATA_TAG_BYTES in path.read_bytes():
        raise ImageReadError(
            "unreadable_file", path, "file is truncated inside its Pixel Data element"
        )
    sop = ds.get("SOPClassUID")
    kind = f" ({sop.name})" if sop is not None else ""
    raise ImageReadError("no_pixel_data", path, f"DICOM object{kind} has no Pixel Data element")


def _check_single_image(ds: Dataset, path: Path) -> None:
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if frames > 1:
        raise ImageReadError(
            "unsupported_image", path, f"multi-frame DICOM ({frames} frames); one image expected"
        )
    rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    if not rows or not columns:
        raise ImageReadError(
            "unsupported_image", path, f"image size Rows={rows} Columns={columns} is not positive"
        )
    if _samples(ds) not in (1, 3):
        raise ImageReadError(
            "unsupported_image", path, f"SamplesPerPixel {_samples(ds)}; 1 or 3 expected"
        )


def _check_complete(ds: Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        return
    data = ds.PixelData
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer is not None and transfer.is_encapsulated:
        if str(transfer).startswith(JPEG_FAMILY_PREFIX) and END_OF_IMAGE not in data[
            -END_MARKER_WINDOW:
        ]:
            raise ImageReadError(
                "unreadable_file", path, "compressed stream is truncated (no end-of-image marker)"
            )
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ImageReadError(
            "unsupported_image", path, f"incomplete Image Pixel module ({error})"
        ) from None
    if len(data) < expected:
        raise ImageReadError(
            "unreadable_file",
            path,
            f"Pixel Data has {len(data)} bytes, {expected} expected (truncated file)",
        )


def _monochrome_to_unit(raw: np.ndarray, ds: Dataset, path: Path | str) -> np.ndarray:
    if "PixelData" not in ds:
        # Float pixel data has no stored-bits range, so its own extremes define [0, 1].
        return _min_max(raw.astype(np.float64))
    if not any(name in ds for name in _GRAYSCALE_TRANSFORMS):
        return _stored_to_unit(raw, ds)
    modality = apply_modality_lut(raw, ds)
    if "VOILUTSequence" in ds:
        # A LUT is indexed by whole numbers; a rescaled (float) input is rounded first.
        indices = np.rint(modality).astype(np.int64) if modality.dtype.kind == "f" else modality
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return apply_voi(indices, ds).astype(np.float64) / (2.0**bits - 1.0)
    values = modality.astype(np.float64)
    window = _window(ds, path)
    if window is not None:
        center, width, function = window
        return linear_window(values, center=center, width=width, function=function)
    low, high = _stored_range(ds)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _stored_to_unit(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map stored values to [0, 1] by their bit depth (the fast path without LUTs).

    Values beyond the declared BitsStored (a wrong header) are clipped to the range.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    unit = raw.astype(np.float32)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        unit += np.float32(2 ** (bits - 1))
    unit *= np.float32(1.0 / (2.0**bits - 1.0))
    return np.clip(unit, 0.0, 1.0, out=unit)


def _window(ds: Dataset, path: Path | str) -> tuple[float, float, str] | None:
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = (_text(ds.get("VOILUTFunction")) or "LINEAR").upper()
    minimum = 1.0 if function == "LINEAR" else 0.0
    if width < minimum or (function != "LINEAR" and width == 0):
        log.warning(
            "%s: WindowWidth %s is invalid for %s; using the full stored range instead",
            path,
            width,
            function,
        )
        return None
    return center, width, function


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """Return the modality-LUT output of the smallest and largest storable value."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    else:
        stored = np.array([0, 2**bits - 1])
    low, high = sorted(float(v) for v in apply_modality_lut(stored, ds))
    return low, (high if high > low else low + 1.0)


def _colour_to_unit(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    # pydicom converts YBR_FULL/YBR_FULL_422 to RGB while decoding (its default).
    bits = int(ds.get("BitsStored", 8))
    gray = raw[..., :3].astype(np.float64) @ np.asarray(LUMA_WEIGHTS)
    return np.clip(gray / (2.0**bits - 1.0), 0.0, 1.0).astype(np.float32)


def _palette_to_unit(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    rgb = apply_color_lut(raw, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    gray = rgb.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)
    return np.clip(gray / (2.0**bits - 1.0), 0.0, 1.0).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _samples(ds: Dataset) -> int:
    return int(ds.get("SamplesPerPixel", 1))


def _transfer_syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "no transfer syntax"


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _first_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(
        value, (str, bytes)
    ):
        if len(value) == 0:  # type: ignore[arg-type]
            return None
        value = value[0]  # type: ignore[index]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
