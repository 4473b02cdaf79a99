"""The synthetic RSNA-style generator: determinism, DICOM validity, realism and statistics."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from common.data import load_dataset, synthesize
from common.data import synth_constants as real
from common.data.dicom import decode_dicom
from common.data.records import Box
from common.data.rsna import CLASS_FILE, IMAGES_DIR, LABELS_FILE
from common.data.synth import SITES_FILE, random_site_styles, sample_case, scale_boxes
from common.data.synth_image import draw_anatomy, render_chest
from common.style import AcquisitionStyle

SIZE = 64
STAT_CASES = 4000


def dataset_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth_summary.json"  # it records the wall time
    }


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, images=8, seed=11, image_size=SIZE, positive_rate=0.5)
    return root


@pytest.fixture(scope="module")
def cases() -> pd.DataFrame:
    """4,000 header and label draws (no pixels), one row per image."""
    rows = []
    for index in range(STAT_CASES):
        case = sample_case(np.random.default_rng([5, index, 0]))
        rows.append({"view": case.view_position, "sex": case.patient_sex,
                     "age": case.patient_age, "target": case.target,
                     "class": case.class_name, "boxes": case.boxes})
    return pd.DataFrame(rows)


def box_table(cases: pd.DataFrame) -> pd.DataFrame:
    rows = [
        {"view": view, "x": b.x, "y": b.y, "width": b.width, "height": b.height}
        for view, boxes in zip(cases["view"], cases["boxes"])
        for b in boxes
    ]
    table = pd.DataFrame(rows)
    table["cx"] = table["x"] + table["width"] / 2
    table["cy"] = table["y"] + table["height"] / 2
    return table


def test_same_seed_gives_identical_files(synthetic, tmp_path):
    again = tmp_path / "again"
    synthesize(again, images=8, seed=11, image_size=SIZE, positive_rate=0.5)
    assert dataset_files(again) == dataset_files(synthetic)


def test_other_seed_gives_other_files(synthetic, tmp_path):
    other = tmp_path / "other"
    synthesize(other, images=8, seed=12, image_size=SIZE, positive_rate=0.5)
    assert (other / LABELS_FILE).read_bytes() != (synthetic / LABELS_FILE).read_bytes()


def test_smaller_dataset_is_a_prefix(synthetic, tmp_path):
    small = tmp_path / "small"
    synthesize(small, images=3, seed=11, image_size=SIZE, positive_rate=0.5)
    small_files = dataset_files(small)
    images = {k: v for k, v in small_files.items() if k.startswith(IMAGES_DIR)}
    assert len(images) == 3
    assert all(dataset_files(synthetic)[name] == data for name, data in images.items())


def test_synthetic_reads_back_through_rsna_reader(synthetic):
    loaded = load_dataset(synthetic, decode=True)
    assert loaded.report.issues == []
    assert len(loaded.records) == 8
    summary = pd.read_json(synthetic / "synth_summary.json", typ="series")
    assert sum(r.target for r in loaded.records) == summary["positives"]
    assert sum(len(r.boxes) for r in loaded.records) == summary["boxes"]
    for record in loaded.records:
        assert record.metadata.modality == "CR"
        assert record.metadata.view_position in ("AP", "PA")
        assert record.metadata.patient_sex in ("F", "M")
        assert 0 <= record.metadata.patient_age <= 104
        assert record.metadata.pixel_spacing in real.PIXEL_SPACING_PROBS_BY_VIEW[
            record.metadata.view_position
        ]
        assert (record.metadata.rows, record.metadata.columns) == (SIZE, SIZE)
        assert record.class_name in ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
        assert (record.class_name == "Lung Opacity") == bool(record.target)


def test_synthetic_dicom_header(synthetic):
    path = next((synthetic / IMAGES_DIR).glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.Modality == "CR"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 1)
    assert ds.PatientID == path.stem == ds.PatientName
    assert ds["PixelData"].VR == "OB"
    image = decode_dicom(path)
    assert image.shape == (SIZE, SIZE)
    assert float(image.std()) > 0.1


def test_label_files_in_rsna_format(synthetic):
    with open(synthetic / LABELS_FILE, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["patientId", "x", "y", "width", "height", "Target"]
    for row in rows[1:]:
        if row[5] == "0":
            assert row[1:5] == ["", "", "", ""]
        else:
            assert all(value.endswith(".0") for value in row[1:5])
    with open(synthetic / CLASS_FILE, newline="") as handle:
        classes = list(csv.reader(handle))
    assert classes[0] == ["patientId", "class"]
    assert [c[0] for c in classes[1:]] == [r[0] for r in rows[1:]]  # one class row per label row


def test_opacity_confined_to_boxes():
    anatomy = draw_anatomy(np.random.default_rng(1), view_position="AP", finding="")
    boxes = (Box(10.0, 20.0, 14.0, 18.0), Box(40.0, 22.0, 12.0, 20.0))
    with_boxes = render_chest(np.random.default_rng(2), size=SIZE, anatomy=anatomy, boxes=boxes,
                              finding="", device=False)
    without = render_chest(np.random.default_rng(2), size=SIZE, anatomy=anatomy, boxes=(),
                           finding="", device=False)
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[20:38, 10:24] = True
    inside[22:42, 40:52] = True
    changed = with_boxes != without
    assert not changed[~inside].any()
    assert float((with_boxes - without)[inside].mean()) > 0.05


def test_lungs_darker_than_mediastinum():
    anatomy = draw_anatomy(np.random.default_rng(3), view_position="PA", finding="")
    image = render_chest(np.random.default_rng(4), size=128, anatomy=anatomy, boxes=(),
                         finding="", device=False)
    lung = image[50:70, 30:45].mean()  # image-left lung field, mid height
    mediastinum = image[50:70, 60:68].mean()
    assert mediastinum - lung > 0.2


def test_positive_rate_and_views_match_real(cases):
    # Binomial standard errors at n = 4,000: about 0.007 (rate) and 0.008 (AP share).
    assert cases["target"].mean() == pytest.approx(real.REAL_POSITIVE_RATE, abs=0.025)
    assert (cases["view"] == "AP").mean() == pytest.approx(real.VIEW_POSITION_PROBS["AP"], abs=0.03)
    ap = cases[cases["view"] == "AP"]["target"].mean()
    pa = cases[cases["view"] == "PA"]["target"].mean()
    assert ap == pytest.approx(0.383, abs=0.04)
    assert pa == pytest.approx(0.093, abs=0.03)


def test_box_counts_match_real(cases):
    positives = cases[cases["target"] == 1]
    per_image = positives["boxes"].map(len)
    real_mean = real.REAL_BOXES / real.REAL_POSITIVE_IMAGES  # 1.589
    assert per_image.mean() == pytest.approx(real_mean, abs=0.07)
    assert set(per_image) <= {1, 2, 3, 4}


def test_box_geometry_matches_constants(cases):
    boxes = box_table(cases)
    for view in ("AP", "PA"):
        subset = boxes[boxes["view"] == view]
        real_width = real.BOX_WIDTH_QUANTILES_BY_VIEW[view][8]  # the median
        real_height = real.BOX_HEIGHT_QUANTILES_BY_VIEW[view][8]
        assert subset["width"].median() == pytest.approx(real_width, rel=0.06)
        assert subset["height"].median() == pytest.approx(real_height, rel=0.08)
    left = boxes[boxes["cx"] < 512]["cx"].median()
    right = boxes[boxes["cx"] >= 512]["cx"].median()
    assert left == pytest.approx(real.BOX_CENTER_X_QUANTILES_BY_SIDE["left"][8], abs=15)
    assert right == pytest.approx(real.BOX_CENTER_X_QUANTILES_BY_SIDE["right"][8], abs=15)
    assert boxes["cy"].median() == pytest.approx(real.BOX_CENTER_Y_QUANTILES[8], abs=15)
    assert (boxes["x"] >= 0).all()
    assert (boxes["x"] + boxes["width"] <= 1024).all()
    assert (boxes["y"] + boxes["height"] <= 1024).all()


def test_box_statistics_match_real_labels(cases, rsna_metadata):
    labels = pd.read_csv(rsna_metadata / LABELS_FILE)
    real_boxes = labels[labels["Target"] == 1]
    real_boxes = real_boxes.assign(cx=real_boxes["x"] + real_boxes["width"] / 2,
                                   cy=real_boxes["y"] + real_boxes["height"] / 2)
    synthetic = box_table(cases)
    # Tolerances: 6 % on size means and 15 px on position means, about 3 standard errors
    # of the ~1,400 synthetic boxes; 0.08 on the width-height rank correlation.
    for column in ("width", "height"):
        assert synthetic[column].mean() == pytest.approx(real_boxes[column].mean(), rel=0.06)
    for column in ("cx", "cy"):
        assert synthetic[column].mean() == pytest.approx(real_boxes[column].mean(), abs=15)
    real_rho = real_boxes[["width", "height"]].corr(method="spearman").iloc[0, 1]
    synthetic_rho = synthetic[["width", "height"]].corr(method="spearman").iloc[0, 1]
    assert synthetic_rho == pytest.approx(real_rho, abs=0.08)
    positives = labels.groupby("patientId")["Target"].max()
    assert cases["target"].mean() == pytest.approx(positives.mean(), abs=0.025)


def test_scale_boxes_rounds_and_zooms():
    box = Box(512.0, 256.0, 100.0, 50.0)
    assert scale_boxes([box], image_size=256, magnification=1.0) == (Box(128.0, 64.0, 25.0, 12.0),)
    # Zoom 1.1 about the centre (512, 512): x0 = 512, y0 = 512 - 256 * 1.1 = 230.4.
    zoomed = scale_boxes([box], image_size=1024, magnification=1.1)
    assert zoomed == (Box(512.0, 230.0, 110.0, 55.0),)


def test_site_styles_written_and_applied(tmp_path):
    styles = [AcquisitionStyle(), AcquisitionStyle(contrast=1.3, gamma=1.2, noise_std=0.03)]
    synthesize(tmp_path / "sites", images=4, seed=2, image_size=SIZE, site_styles=styles)
    sites = pd.read_csv(tmp_path / "sites" / SITES_FILE)
    assert list(sites["site"]) == [0, 1, 0, 1]
    synthesize(tmp_path / "plain", images=4, seed=2, image_size=SIZE)
    for row in sites.itertuples():
        styled = decode_dicom(tmp_path / "sites" / IMAGES_DIR / f"{row.patientId}.dcm")
        plain = decode_dicom(tmp_path / "plain" / IMAGES_DIR / f"{row.patientId}.dcm")
        if row.site == 0:
            np.testing.assert_array_equal(styled, plain)
        else:
            assert np.abs(styled - plain).mean() > 0.02


def test_site_magnification_zooms_ap_boxes_only(tmp_path):
    zoom = [AcquisitionStyle(magnification=1.25)]
    synthesize(tmp_path / "zoom", images=30, seed=6, image_size=SIZE, site_styles=zoom,
               positive_rate=0.6)
    records = {r.patient_id: r for r in load_dataset(tmp_path / "zoom").records}
    zoomed_views = set()
    for index in range(30):
        case = sample_case(np.random.default_rng([6, index, 0]), positive_rate=0.6)
        factor = 1.25 if case.view_position == "AP" else 1.0
        expected = scale_boxes(case.boxes, image_size=SIZE, magnification=factor)
        assert records[case.patient_id].boxes == expected
        if case.boxes:
            zoomed_views.add(case.view_position)
    assert zoomed_views == {"AP", "PA"}  # both kinds of film were checked


def test_random_site_styles_deterministic():
    first = random_site_styles(3, seed=4)
    assert first == random_site_styles(3, seed=4)
    assert first != random_site_styles(3, seed=5)
    assert all(1.0 <= style.magnification <= 1.1 for style in first)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"images": 0, "seed": 1}, "images must be a positive int; got 0"),
        ({"images": 2, "seed": -1}, "seed must be a non-negative int; got -1"),
        ({"images": 2, "seed": 1, "image_size": 16}, "image_size must be an int >= 32"),
        ({"images": 2, "seed": 1, "positive_rate": 1.5}, "positive_rate must lie in"),
    ],
)
def test_invalid_arguments_rejected(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "out", **arguments)


def test_non_empty_output_rejected(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not empty"):
        synthesize(tmp_path / "out", images=1, seed=0, image_size=SIZE)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
