"""DICOM decoding on pydicom's bundled test files and on small hand-built datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from common.data.dicom import (
    ImageReadError,
    decode_dicom,
    dicom_metadata,
    linear_window,
    parse_age,
    parse_spacing,
    read_dicom,
)


def bundled(name: str) -> Path:
    """Return a bundled pydicom test file, skipping when the installed copy lacks it."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


def write_dataset(path: Path, pixels: np.ndarray, **elements) -> Path:
    """Write an uncompressed single-frame grayscale DICOM with extra ``elements``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# pydicom's bundled CR images: MONOCHROME1, 12 bits stored, RescaleSlope 0.684,
# RescaleIntercept 200, WindowCenter 1600, WindowWidth 2800.
MONOCHROME1_CR = ("6154", "6247", "6278")


@pytest.mark.parametrize("name", MONOCHROME1_CR)
def test_monochrome1_cr_is_inverted_exactly(name):
    path = bundled(name)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    rescaled = raw * 0.684 + 200.0
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window mapped to [0, 1], then inverted.
    expected = 1.0 - np.clip((rescaled - 1599.5) / 2799.0 + 0.5, 0.0, 1.0)
    image = decode_dicom(path)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert np.unravel_index(image.argmin(), image.shape) == np.unravel_index(
        raw.argmax(), raw.shape
    )


# Compressed copies of MR_small.dcm (64 x 64, 16-bit) in each lossless syntax.
LOSSLESS_COPIES = (
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
)


@pytest.mark.parametrize("name", LOSSLESS_COPIES)
def test_lossless_syntaxes_equal_uncompressed(name):
    reference = decode_dicom(bundled("MR_small.dcm"))
    image = decode_dicom(bundled(name))
    assert image.shape == (64, 64)
    np.testing.assert_array_equal(image, reference)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPEG2000.dcm", (1024, 256)),
        ("693_J2KI.dcm", (512, 512)),
        ("JPEGLSNearLossless_16.dcm", (50, 10)),
        ("JPGExtended.dcm", (1024, 256)),
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),
        ("SC_rgb_rle.dcm", (100, 100)),
        ("SC_rgb_gdcm_KY.dcm", (100, 100)),
    ],
)
def test_compressed_syntaxes_decode(name, shape):
    image = decode_dicom(bundled(name))
    assert image.shape == shape
    assert image.dtype == np.float32
    assert 0.0 <= image.min() <= image.max() <= 1.0
    assert image.max() > image.min()


def test_rgb_becomes_luma_gray():
    path = bundled("SC_rgb_small_odd.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255.0
    np.testing.assert_allclose(decode_dicom(path), expected, atol=1e-6)


def test_jpeg_rgb_close_to_uncompressed_rgb():
    # The same 100 x 100 picture, uncompressed RLE vs lossy JPEG Baseline (YBR).
    lossless = decode_dicom(bundled("SC_rgb_rle.dcm"))
    lossy = decode_dicom(bundled("SC_rgb_jpeg_dcmtk.dcm"))
    assert np.abs(lossless - lossy).mean() < 0.02


def test_multi_frame_rejected_naming_file():
    path = bundled("SC_rgb_rle_2frame.dcm")
    with pytest.raises(ImageReadError) as caught:
        decode_dicom(path)
    assert caught.value.kind == "unsupported_image"
    assert str(path) in str(caught.value)
    assert "2 frames" in str(caught.value)


def test_structured_report_rejected_naming_file():
    path = bundled("test-SR.dcm")
    with pytest.raises(ImageReadError) as caught:
        read_dicom(path)
    assert caught.value.kind == "no_pixel_data"
    assert str(path) in str(caught.value)
    assert "Comprehensive SR" in str(caught.value)


def test_truncated_uncompressed_rejected():
    path = bundled("MR_truncated.dcm")
    with pytest.raises(ImageReadError) as caught:
        read_dicom(path)
    assert caught.value.kind == "unreadable_file"
    assert "8130 bytes, 8192 expected" in str(caught.value)


def test_not_dicom_rejected(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not an image")
    with pytest.raises(ImageReadError) as caught:
        read_dicom(path)
    assert caught.value.kind == "unreadable_file"
    assert str(path) in str(caught.value)


def test_bit_depth_normalised_without_window(tmp_path):
    pixels = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    path = write_dataset(tmp_path / "a.dcm", pixels, BitsStored=12, HighBit=11)
    np.testing.assert_allclose(decode_dicom(path), pixels / 4095.0, atol=1e-7)


def test_eight_bit_divided_by_255(tmp_path):
    pixels = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    path = write_dataset(tmp_path / "a.dcm", pixels)
    np.testing.assert_allclose(decode_dicom(path), pixels / 255.0, atol=1e-7)


def test_signed_rescale_uses_stored_range(tmp_path):
    # Signed 16-bit with slope 2, intercept -100: stored range maps to [-65636, 65434].
    pixels = np.array([[-32768, 0], [100, 32767]], dtype=np.int16)
    path = write_dataset(
        tmp_path / "a.dcm", pixels, RescaleSlope="2", RescaleIntercept="-100"
    )
    low, high = -32768 * 2 - 100, 32767 * 2 - 100
    expected = (pixels.astype(np.float64) * 2 - 100 - low) / (high - low)
    np.testing.assert_allclose(decode_dicom(path), expected, atol=1e-7)


def test_window_applied_after_rescale(tmp_path):
    pixels = np.array([[0, 100], [150, 300]], dtype=np.uint16)
    path = write_dataset(
        tmp_path / "a.dcm", pixels, RescaleSlope="1", RescaleIntercept="-50",
        WindowCenter="100", WindowWidth="101",
    )
    # x = p - 50; y = clip((x - 99.5) / 100 + 0.5, 0, 1)
    expected = np.array([[0.0, 0.005], [0.505, 1.0]])
    np.testing.assert_allclose(decode_dicom(path), expected, atol=1e-6)


def test_voi_lut_sequence_applied(tmp_path):
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.add_new(0x00283006, "US", [0, 1000, 30000, 65535])  # LUT Data
    path = write_dataset(
        tmp_path / "a.dcm", pixels, BitsStored=12, HighBit=11, VOILUTSequence=[item],
        WindowCenter="1", WindowWidth="1",
    )
    # The LUT wins over the window; its 16-bit output is divided by 65535.
    expected = np.array([[0, 1000], [30000, 65535]]) / 65535.0
    np.testing.assert_allclose(decode_dicom(path), expected, atol=1e-7)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("LINEAR_EXACT", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("SIGMOID", [1 / (1 + np.exp(2)), 1 / (1 + np.exp(1)), 0.5, 1 / (1 + np.exp(-1)),
                     1 / (1 + np.exp(-2))]),
    ],
)
def test_window_functions(function, expected):
    if function == "LINEAR":
        # Centre 2, width 3: (x - 1.5) / 2 + 0.5 at x = 0.5 .. 2.5 gives 0, .25, .5, .75, 1.
        values, center, width = np.array([0.5, 1.0, 1.5, 2.0, 2.5]), 2.0, 3.0
    else:
        values, center, width = np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), 0.0, 2.0
    result = linear_window(values, center=center, width=width, function=function)
    np.testing.assert_allclose(result, expected, atol=1e-12)


def test_window_width_one_is_a_step():
    result = linear_window(np.array([9.4, 9.6]), center=10.0, width=1.0, function="LINEAR")
    np.testing.assert_array_equal(result, [0.0, 1.0])


@pytest.mark.parametrize(
    ("text", "years"),
    [("043Y", 43), ("32", 32), ("006M", 0), ("018M", 1), ("052W", 0), ("400D", 1),
     ("", None), ("abc", None), (None, None)],
)
def test_parse_age(text, years):
    assert parse_age(text) == years


@pytest.mark.parametrize(
    ("value", "millimetres"),
    [("0.168", 0.168), ("[0.139, 0.139]", 0.139), ("0.143\\0.143", 0.143), ("", None),
     ("x", None), (None, None)],
)
def test_parse_spacing(value, millimetres):
    assert parse_spacing(value) == millimetres


def test_metadata_of_rsna_style_header(tmp_path):
    path = write_dataset(
        tmp_path / "a.dcm", np.zeros((4, 6), dtype=np.uint8), ViewPosition="AP",
        PatientSex="F", PatientAge="032Y", PixelSpacing=["0.139", "0.139"],
    )
    meta = dicom_metadata(read_dicom(path))
    assert meta.view_position == "AP"
    assert meta.patient_sex == "F"
    assert meta.patient_age == 32
    assert meta.pixel_spacing == pytest.approx(0.139)
    assert meta.modality == "CR"
    assert (meta.rows, meta.columns, meta.bits_stored) == (4, 6, 8)
