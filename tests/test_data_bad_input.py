"""Bad input in the RSNA layout: each case skipped or repaired, warned about and counted."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from common.data import load_dataset
from common.data.load import scan_dataset
from common.data.rsna import CLASS_FILE, IMAGES_DIR, LABELS_FILE
from common.data.summary import summarize

POSITIVE = "00436515-870c-4b36-a041-de91049b9ab4"  # boxes (264,152,213,379), (562,152,256,453)
NEGATIVE = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # "No Lung Opacity / Not Normal"
OTHER_NEGATIVE = "003d8fa0-6bf1-40ed-b54c-ac657f8495c5"  # "Normal"


@pytest.fixture
def rsna_copy(rsna_sample, tmp_path) -> Path:
    """A writable RSNA folder: the sample's CSVs copied, its DICOMs linked."""
    root = tmp_path / "rsna"
    (root / IMAGES_DIR).mkdir(parents=True)
    for name in (LABELS_FILE, CLASS_FILE):
        shutil.copyfile(rsna_sample / name, root / name)
    for path in sorted((rsna_sample / IMAGES_DIR).glob("*.dcm")):
        (root / IMAGES_DIR / path.name).symlink_to(path)
    return root


def image_path(root: Path, patient_id: str) -> Path:
    return root / IMAGES_DIR / f"{patient_id}.dcm"


def replace_image(root: Path, patient_id: str, data: bytes) -> Path:
    path = image_path(root, patient_id)
    path.unlink()
    path.write_bytes(data)
    return path


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def edit_labels(root: Path, edit) -> None:
    rows = read_rows(root / LABELS_FILE)
    write_rows(root / LABELS_FILE, [rows[0]] + edit(rows[1:]))


def record(loaded, patient_id):
    return next(r for r in loaded.records if r.patient_id == patient_id)


def assert_one_issue(loaded, kind: str, text: str, caplog) -> None:
    issues = loaded.report.of_kind(kind)
    assert len(issues) == 1, [i.message for i in loaded.report.issues]
    assert text in issues[0].location + issues[0].message
    assert text in caplog.text
    assert loaded.report.counts()[kind] == 1


def test_unreadable_dicom_skipped(rsna_copy, caplog):
    path = replace_image(rsna_copy, NEGATIVE, b"garbage, not a DICOM file")
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "unreadable_file", str(path), caplog)
    assert len(loaded.records) == 15
    assert NEGATIVE not in [r.patient_id for r in loaded.records]


def test_truncated_dicom_skipped(rsna_copy, caplog):
    data = image_path(rsna_copy, POSITIVE).read_bytes()
    path = replace_image(rsna_copy, POSITIVE, data[: len(data) // 2])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "unreadable_file", str(path), caplog)
    assert "truncated" in loaded.report.of_kind("unreadable_file")[0].message
    assert sum(r.target for r in loaded.records) == 4


def test_dicom_without_pixel_data_skipped(rsna_copy, caplog):
    ds = pydicom.dcmread(image_path(rsna_copy, NEGATIVE))
    del ds.PixelData
    path = image_path(rsna_copy, NEGATIVE)
    path.unlink()
    ds.save_as(path)
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "no_pixel_data", str(path), caplog)
    assert len(loaded.records) == 15


def test_multi_frame_dicom_skipped(rsna_copy, caplog):
    data = Path(get_testdata_file("SC_rgb_rle_2frame.dcm")).read_bytes()
    path = replace_image(rsna_copy, NEGATIVE, data)
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "unsupported_image", str(path), caplog)


def test_corrupt_jpeg_counted_when_decoding(rsna_copy, caplog):
    ds = pydicom.dcmread(image_path(rsna_copy, NEGATIVE))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    # A differential-frame marker in place of the baseline frame header: libjpeg refuses it.
    ds.PixelData = encapsulate([frame.replace(b"\xff\xc0", b"\xff\xcf", 1)])
    path = image_path(rsna_copy, NEGATIVE)
    path.unlink()
    ds.save_as(path)
    assert load_dataset(rsna_copy).report.issues == []  # headers alone look fine
    loaded = load_dataset(rsna_copy, decode=True)
    assert_one_issue(loaded, "decode_failed", str(path), caplog)
    assert summarize(loaded)["decode_failures"] == 1


def test_label_row_without_image(rsna_copy, caplog):
    image_path(rsna_copy, POSITIVE).unlink()
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "missing_image", POSITIVE, caplog)
    assert len(loaded.records) == 15
    assert loaded.report.failed_images == 0


def test_image_without_label_row(rsna_copy, caplog):
    edit_labels(rsna_copy, lambda rows: [r for r in rows if r[0] != NEGATIVE])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "unlabeled_image", str(image_path(rsna_copy, NEGATIVE)), caplog)
    # Its class row now names a patient the labels do not know.
    assert loaded.report.counts()["unknown_patient"] == 1
    assert len(loaded.records) == 15


def test_partial_image_folder_loads(rsna_copy):
    for path in sorted((rsna_copy / IMAGES_DIR).glob("*.dcm"))[4:]:
        path.unlink()
    loaded = load_dataset(rsna_copy)
    assert len(loaded.records) == 4
    assert loaded.report.counts()["missing_image"] == 12


def test_box_partly_outside_is_clipped(rsna_copy, caplog):
    def widen(rows):
        for row in rows:
            if row[0] == POSITIVE and row[1] == "562":
                row[3] = "600"  # x 562 + 600 reaches 1162 > 1024
            elif row[0] == POSITIVE and row[1] == "264":
                row[1], row[3] = "-36", "313"  # starts left of the image
        return rows

    edit_labels(rsna_copy, widen)
    loaded = load_dataset(rsna_copy)
    clipped = loaded.report.of_kind("box_clipped")
    assert len(clipped) == 2
    assert "line 6" in clipped[0].location  # the x = -36 row, clipped while parsing
    assert POSITIVE in caplog.text
    boxes = sorted(b.as_list() for b in record(loaded, POSITIVE).boxes)
    assert boxes == [[0.0, 152.0, 277.0, 379.0], [562.0, 152.0, 462.0, 453.0]]


def test_box_of_non_positive_size_dropped(rsna_copy, caplog):
    edit_labels(rsna_copy, lambda rows: rows + [[POSITIVE, "100", "100", "0", "50", "1"]])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "box_dropped", "line 23", caplog)
    assert len(record(loaded, POSITIVE).boxes) == 2


def test_non_numeric_coordinates_on_positive_row(rsna_copy, caplog):
    edit_labels(rsna_copy, lambda rows: rows + [[POSITIVE, "abc", "100", "50", "50", "1"]])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "bad_coordinates", "line 23", caplog)
    assert len(record(loaded, POSITIVE).boxes) == 2


def test_positive_with_only_bad_rows_skipped(rsna_copy, caplog):
    def break_boxes(rows):
        return [[r[0], "", "", "", "", "1"] if r[0] == POSITIVE else r for r in rows]

    edit_labels(rsna_copy, break_boxes)
    loaded = load_dataset(rsna_copy)
    assert loaded.report.counts()["bad_coordinates"] == 1  # the second row is a duplicate
    assert loaded.report.counts()["duplicate_row"] == 1
    assert_one_issue(loaded, "positive_without_boxes", POSITIVE, caplog)
    assert POSITIVE not in [r.patient_id for r in loaded.records]


def test_duplicate_rows_dropped(rsna_copy, caplog):
    def duplicate(rows):
        return rows + [list(r) for r in rows if r[0] in (POSITIVE, NEGATIVE)]

    edit_labels(rsna_copy, duplicate)
    loaded = load_dataset(rsna_copy)
    duplicates = loaded.report.of_kind("duplicate_row")
    assert len(duplicates) == 3
    assert [d.location.rsplit(" ", 1)[1] for d in duplicates] == ["23", "24", "25"]
    assert len(record(loaded, POSITIVE).boxes) == 2
    assert sum(len(r.boxes) for r in loaded.records) == 10


def test_invalid_target_rejected(rsna_copy, caplog):
    edit_labels(rsna_copy, lambda rows: rows + [[NEGATIVE, "", "", "", "", "2"]])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "invalid_target", "'2'", caplog)


def test_coordinates_on_negative_row_ignored(rsna_copy, caplog):
    def add_box(rows):
        return [[r[0], "10", "10", "20", "20", "0"] if r[0] == NEGATIVE else r for r in rows]

    edit_labels(rsna_copy, add_box)
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "coordinates_on_negative", NEGATIVE, caplog)
    assert record(loaded, NEGATIVE).boxes == ()
    assert record(loaded, NEGATIVE).target == 0


def test_conflicting_target_kept_positive(rsna_copy, caplog):
    edit_labels(rsna_copy, lambda rows: rows + [[POSITIVE, "", "", "", "", "0"]])
    loaded = load_dataset(rsna_copy)
    assert_one_issue(loaded, "conflicting_target", POSITIVE, caplog)
    assert record(loaded, POSITIVE).target == 1


def test_class_file_disagreeing_with_labels(rsna_copy, caplog):
    rows = read_rows(rsna_copy / CLASS_FILE)
    for row in rows[1:]:
        if row[0] == POSITIVE:
            row[1] = "Normal"
        elif row[0] == OTHER_NEGATIVE:
            row[1] = "Lung Opacity"
    write_rows(rsna_copy / CLASS_FILE, rows)
    loaded = load_dataset(rsna_copy)
    mismatches = loaded.report.of_kind("class_mismatch")
    assert len(mismatches) == 2
    assert caplog.text.count("the labels win") == 2
    assert record(loaded, POSITIVE).class_name == "Lung Opacity"
    assert record(loaded, OTHER_NEGATIVE).class_name == "Unknown"
    assert summarize(loaded)["label_mismatches"]["class_mismatch"] == 2


def test_failure_fraction_stops_load(rsna_copy):
    for patient_id in (POSITIVE, NEGATIVE):
        replace_image(rsna_copy, patient_id, b"broken")
    # 2 of 16 images failed: 12.5 %.
    with pytest.raises(ValueError, match=r"2 of 16 images failed \(12\.5%\)"):
        load_dataset(rsna_copy, max_failure_fraction=0.1)
    loaded = load_dataset(rsna_copy, max_failure_fraction=0.125)
    assert len(loaded.records) == 14


def test_rejected_rows_fraction_stops_load(rsna_copy):
    edit_labels(rsna_copy, lambda rows: rows + [[NEGATIVE, "", "", "", "", "x"]] * 5)
    with pytest.raises(ValueError, match=r"5 of 26 label rows failed"):
        load_dataset(rsna_copy)


def test_scan_reports_without_stopping(rsna_copy):
    for path in sorted((rsna_copy / IMAGES_DIR).glob("*.dcm")):
        replace_image(rsna_copy, path.stem, b"broken")
    loaded = scan_dataset(rsna_copy)
    summary = summarize(loaded)
    assert summary["images"] == 0
    assert summary["failed_images"]["unreadable_file"] == 16
    assert summary["would_load"] is False
    with pytest.raises(ValueError, match="16 of 16 images failed"):
        load_dataset(rsna_copy)


def test_empty_folder_names_expected_layouts(tmp_path):
    with pytest.raises(ValueError) as caught:
        load_dataset(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "stage_2_train_labels.csv" in message
    assert "images/<id>.png" in message


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "absent")


def test_missing_images_folder_named(rsna_copy):
    shutil.rmtree(rsna_copy / IMAGES_DIR)
    with pytest.raises(FileNotFoundError, match="stage_2_train_images"):
        load_dataset(rsna_copy)


def test_labels_header_missing_column(rsna_copy):
    write_rows(rsna_copy / LABELS_FILE, [["patientId", "x", "y", "w", "h", "Target"]])
    with pytest.raises(ValueError, match=r"lacks column\(s\) width, height"):
        load_dataset(rsna_copy)


def test_labels_without_rows(rsna_copy):
    edit_labels(rsna_copy, lambda rows: [])
    with pytest.raises(ValueError, match="no data rows"):
        load_dataset(rsna_copy)


def test_warnings_rate_limited_but_all_counted(rsna_copy, caplog):
    caplog.set_level(logging.WARNING)
    edit_labels(rsna_copy, lambda rows: rows + [[f"p{i}", "", "", "", "", "0"] for i in range(25)])
    loaded = load_dataset(rsna_copy)
    assert loaded.report.counts()["missing_image"] == 25
    assert caplog.text.count("its DICOM is missing") == 10
    assert "15 more missing_image issues" in caplog.text
