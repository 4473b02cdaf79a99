"""The RSNA reader on the real sample (16 DICOMs) and the full labels file (26,684 patients)."""

from __future__ import annotations

import csv
from collections import defaultdict
from itertools import combinations

import numpy as np
import pytest

from common.data import load_dataset, read_rsna_labels
from common.data.dicom import decode_dicom
from common.data.masks import box_mask
from common.data.rsna import CLASS_FILE, LABELS_FILE, read_rsna_classes

MISSING_CLASS_PATIENT = "489a175a-4c5c-4b7f-8fdc-cd8514404dbe"


def csv_boxes(root) -> dict[str, list[tuple[int, int, int, int]]]:
    """Read the labels CSV independently of the reader: integer boxes per patient."""
    boxes: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    with open(root / LABELS_FILE, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Target"] == "1":
                boxes[row["patientId"]].append(
                    tuple(int(float(row[k])) for k in ("x", "y", "width", "height"))
                )
            else:
                boxes.setdefault(row["patientId"], [])
    return boxes


def union_area(boxes: list[tuple[int, int, int, int]]) -> int:
    """Return the area of a union of integer boxes by inclusion-exclusion."""
    total = 0
    for size in range(1, len(boxes) + 1):
        for group in combinations(boxes, size):
            x0 = max(b[0] for b in group)
            y0 = max(b[1] for b in group)
            x1 = min(b[0] + b[2] for b in group)
            y1 = min(b[1] + b[3] for b in group)
            overlap = max(0, x1 - x0) * max(0, y1 - y0)
            total += overlap if size % 2 else -overlap
    return total


def centre_mask(boxes, *, source: int, size: int) -> np.ndarray:
    """Mask by testing every pixel centre against every scaled box (brute force)."""
    centres = (np.arange(size) + 0.5) * source / size  # centres in source pixels
    xs, ys = np.meshgrid(centres, centres)
    mask = np.zeros((size, size), dtype=np.uint8)
    for x, y, w, h in boxes:
        mask |= ((xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)).astype(np.uint8)
    return mask


@pytest.fixture(scope="module")
def sample(rsna_sample):
    return load_dataset(rsna_sample)


def test_sample_counts(sample):
    assert sample.layout == "rsna"
    assert len(sample.records) == 16
    assert sum(r.target for r in sample.records) == 5
    assert sum(len(r.boxes) for r in sample.records) == 10
    assert sample.report.issues == []


def test_sample_classes_and_order(sample):
    ids = [r.patient_id for r in sample.records]
    assert ids == sorted(ids)
    classes = [r.class_name for r in sample.records]
    assert classes.count("Lung Opacity") == 5
    assert classes.count("Normal") == 4
    assert classes.count("No Lung Opacity / Not Normal") == 7


def test_sample_header_metadata(sample):
    first = sample.records[0].metadata
    assert first.view_position == "PA"
    assert first.patient_sex == "F"
    assert first.patient_age == 51
    assert first.pixel_spacing == pytest.approx(0.143)
    assert first.modality == "CR"
    assert (first.rows, first.columns, first.bits_stored) == (1024, 1024, 8)
    views = [r.metadata.view_position for r in sample.records]
    assert views.count("AP") == 6
    assert views.count("PA") == 10


def test_sample_frame_columns(sample):
    frame = sample.frame()
    for column in ("patient_id", "image_path", "target", "class_name", "n_boxes", "ViewPosition",
                   "PatientSex", "PatientAge", "PixelSpacing", "Modality"):
        assert column in frame.columns
    assert str(frame["target"].dtype) == "int64"
    assert str(frame["PatientAge"].dtype) == "Int64"
    assert str(frame["PixelSpacing"].dtype) == "float64"
    assert int(frame["n_boxes"].sum()) == 10
    assert frame["PixelSpacing"].between(0.139, 0.195).all()


def test_full_resolution_mask_equals_union_area(sample, rsna_sample):
    expected = csv_boxes(rsna_sample)
    for record in sample.records:
        mask = box_mask(record.boxes, rows=1024, columns=1024, size=1024)
        assert int(mask.sum()) == union_area(expected[record.patient_id]), record.patient_id


@pytest.mark.parametrize("size", [64, 128, 256])
def test_scaled_masks_match_scaled_boxes(sample, rsna_sample, size):
    expected = csv_boxes(rsna_sample)
    for record in sample.records:
        mask = box_mask(record.boxes, rows=1024, columns=1024, size=size)
        reference = centre_mask(expected[record.patient_id], source=1024, size=size)
        np.testing.assert_array_equal(mask, reference, err_msg=record.patient_id)
        assert bool(mask.any()) == bool(record.target)


def test_every_sample_image_decodes(sample):
    for record in sample.records:
        image = decode_dicom(record.image_path)
        assert image.shape == (1024, 1024)
        assert image.dtype == np.float32
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
        assert float(image.std()) > 0.05  # a radiograph, not a blank frame


def test_metadata_label_counts(rsna_metadata):
    patients, report = read_rsna_labels(rsna_metadata / LABELS_FILE)
    assert len(patients) == 26_684
    assert sum(len(p.boxes) for p in patients.values()) == 9_555
    assert sum(p.target for p in patients.values()) == 6_012
    assert report.label_rows == 30_227
    assert report.issues == []


def test_metadata_missing_class_reported(rsna_metadata, caplog):
    patients, report = read_rsna_labels(rsna_metadata / LABELS_FILE)
    read_rsna_classes(rsna_metadata / CLASS_FILE, patients, report)
    missing = report.of_kind("missing_class")
    assert len(missing) == 1
    assert MISSING_CLASS_PATIENT in missing[0].message
    assert patients[MISSING_CLASS_PATIENT].class_name == "Lung Opacity"
    assert MISSING_CLASS_PATIENT in caplog.text
    assert report.counts()["class_mismatch"] == 0


def test_metadata_loads_without_images(rsna_metadata):
    loaded = load_dataset(rsna_metadata, require_images=False)
    frame = loaded.frame()
    assert len(frame) == 26_684
    assert int(frame["target"].sum()) == 6_012
    assert int(frame["n_boxes"].sum()) == 9_555
    counts = loaded.report.counts()
    assert counts["missing_image"] == 26_684
    assert counts["missing_class"] == 1
    assert counts["implausible_age"] == 5  # headers with ages 148 to 155
    # The header table fills the metadata of images that are not there.
    assert frame["ViewPosition"].value_counts().to_dict() == {"PA": 14_511, "AP": 12_173}
    assert frame["PatientAge"].notna().all()
