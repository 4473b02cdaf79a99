"""The images/ + masks/ folder layout: formats, mask values, metadata and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data import load_dataset
from common.data.cache import decode_record
from common.data.images import read_image, read_mask
from common.data.masks import resample_mask


def gray_pixels(height: int = 20, width: int = 30) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def rect_mask(height: int = 20, width: int = 30, *, value: int = 255) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:15, 10:25] = value
    return mask


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three images (gray PNG, RGB JPEG, RGBA PNG), masks 0/255, 0/1 and empty."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pixels = gray_pixels()
    Image.fromarray(pixels).save(root / "images" / "a.png")
    Image.fromarray(np.stack([pixels] * 3, -1)).save(root / "images" / "b.jpg", quality=95)
    rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    Image.fromarray(rgba, mode="RGBA").save(root / "images" / "c.png")
    Image.fromarray(rect_mask(value=255)).save(root / "masks" / "a.png")
    Image.fromarray(rect_mask(value=1)).save(root / "masks" / "b.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "masks" / "c.png")
    return root


def test_folder_records_and_targets(folder):
    loaded = load_dataset(folder)
    assert loaded.layout == "folder"
    assert [r.patient_id for r in loaded.records] == ["a", "b", "c"]
    assert [r.target for r in loaded.records] == [1, 1, 0]
    assert [r.class_name for r in loaded.records] == ["Lung Opacity", "Lung Opacity", "Unknown"]
    assert loaded.report.issues == []
    frame = loaded.frame()
    assert frame["n_boxes"].isna().all()
    assert list(frame["rows"]) == [20, 20, 20]
    assert list(frame["columns"]) == [30, 30, 30]


def test_colour_images_become_gray(folder):
    expected = gray_pixels() / 255.0
    np.testing.assert_allclose(read_image(folder / "images" / "a.png"), expected, atol=1e-7)
    # RGBA with equal channels: gray equals the channel value; alpha is dropped.
    np.testing.assert_allclose(read_image(folder / "images" / "c.png"), expected, atol=1e-7)
    lossy = read_image(folder / "images" / "b.jpg")
    assert lossy.shape == (20, 30)
    assert np.abs(lossy - expected).mean() < 0.03


def test_sixteen_bit_png_divided_by_65535(tmp_path):
    pixels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_allclose(read_image(tmp_path / "x.png"), pixels / 65535.0, atol=1e-7)


@pytest.mark.parametrize("value", [1, 255])
def test_mask_levels_read_as_zero_one(tmp_path, value):
    Image.fromarray(rect_mask(value=value)).save(tmp_path / "m.png")
    result = read_mask(tmp_path / "m.png")
    assert not result.thresholded
    np.testing.assert_array_equal(result.mask, rect_mask(value=1))


def test_mask_other_values_thresholded_and_reported(folder, caplog):
    mask = rect_mask(value=200)
    mask[0, 0] = 100  # below half of 255: background
    Image.fromarray(mask).save(folder / "masks" / "a.png")
    loaded = load_dataset(folder)
    issues = loaded.report.of_kind("mask_values")
    assert len(issues) == 1
    assert "a.png" in issues[0].location
    assert "thresholded" in caplog.text
    _, resized = decode_record(loaded.records[0], 30)
    assert int(resized.sum()) > 0


def test_mask_size_mismatch_skipped(folder, caplog):
    Image.fromarray(rect_mask(10, 10)).save(folder / "masks" / "b.png")
    loaded = load_dataset(folder, max_failure_fraction=0.5)
    issues = loaded.report.of_kind("bad_mask")
    assert len(issues) == 1
    assert "10 x 10 but its image is 30 x 20" in issues[0].message
    assert [r.patient_id for r in loaded.records] == ["a", "c"]
    assert "b.png" in caplog.text


def test_image_without_mask_and_mask_without_image(folder, caplog):
    (folder / "masks" / "c.png").rename(folder / "masks" / "z.png")
    loaded = load_dataset(folder)
    assert [i.location for i in loaded.report.of_kind("unlabeled_image")] == [
        str(folder / "images" / "c.png")
    ]
    assert [i.location for i in loaded.report.of_kind("missing_image")] == [
        str(folder / "masks" / "z.png")
    ]
    assert loaded.report.failed_images == 0
    assert len(loaded.records) == 2


def test_duplicate_image_ids_skipped(folder, caplog):
    shutil.copyfile(folder / "images" / "a.png", folder / "images" / "a.jpg")
    loaded = load_dataset(folder)
    issues = loaded.report.of_kind("duplicate_image")
    assert len(issues) == 1
    assert "a.jpg, a.png" in issues[0].message
    assert [r.patient_id for r in loaded.records] == ["b", "c"]


def test_unreadable_image_skipped(folder, caplog):
    (folder / "images" / "b.jpg").write_bytes(b"not a jpeg")
    loaded = load_dataset(folder, max_failure_fraction=0.5)
    assert [i.kind for i in loaded.report.issues] == ["unreadable_file"]
    assert "b.jpg" in caplog.text


def test_metadata_csv_merged(folder):
    pd.DataFrame(
        {
            "id": ["a", "b", "ghost"],
            "ViewPosition": ["PA", "AP", "PA"],
            "PatientSex": ["F", "M", "F"],
            "PatientAge": ["043Y", "7", ""],
            "PixelSpacing": ["0.2", "[0.15, 0.15]", ""],
            "hospital": ["north", "south", "east"],
        }
    ).to_csv(folder / "metadata.csv", index=False)
    loaded = load_dataset(folder)
    frame = loaded.frame().set_index("patient_id")
    assert frame.loc["a", "ViewPosition"] == "PA"
    assert frame.loc["b", "PatientAge"] == 7
    assert frame.loc["a", "PixelSpacing"] == pytest.approx(0.2)
    assert frame.loc["b", "PixelSpacing"] == pytest.approx(0.15)
    assert frame.loc["b", "hospital"] == "south"
    assert pd.isna(frame.loc["c", "PatientAge"])
    assert [i.kind for i in loaded.report.issues] == ["unknown_patient"]


def test_metadata_csv_without_id_column(folder):
    pd.DataFrame({"name": ["a"]}).to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="no id column"):
        load_dataset(folder)


def test_missing_masks_folder_named(folder):
    shutil.rmtree(folder / "masks")
    with pytest.raises(FileNotFoundError, match="masks"):
        load_dataset(folder)


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="no usable image"):
        load_dataset(tmp_path)


def test_mask_resampling_uses_pixel_centres():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 0:3] = 1
    # Target pixel c of 4 samples source pixel floor((c + 0.5) * 2) = 1, 3, 5, 7.
    expected = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(resample_mask(mask, 4), expected)
