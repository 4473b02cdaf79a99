"""Records frames: age bands, records CSV validation and the RSNA label folder reader."""

import logging

import pandas as pd
import pytest

from common.sites import read_records_csv, rsna_metadata_frame
from common.sites.frames import RSNA_CLASS_FILE, RSNA_HEADERS_FILE, RSNA_LABELS_FILE, age_bands


def test_age_bands_edges():
    ages = pd.Series([0, 17, 18, 39, 40, 59, 60, 155, None], dtype="Int64")
    assert age_bands(ages).tolist() == ["<18", "<18", "18-39", "18-39", "40-59", "40-59", "60+", "60+", ""]


def test_records_csv_types_and_skipped_rows(tmp_path, caplog):
    path = tmp_path / "records.csv"
    path.write_text(
        "patient_id,target,ViewPosition,PatientSex,PatientAge,hospital\n"
        "a,1,AP,F,34,north\n"
        "b,0,PA,M,,south\n"
        ",1,PA,M,50,south\n"
        "c,yes,PA,M,50,south\n"
        "d,0, PA ,M,forty,north\n"
        "e,0,PA,F,150,north\n"
    )
    with caplog.at_level(logging.WARNING):
        frame = read_records_csv(path)
    assert frame["patient_id"].tolist() == ["a", "b", "d", "e"]
    assert frame["target"].tolist() == [1, 0, 0, 0]
    assert frame["ViewPosition"].tolist() == ["AP", "PA", "PA", "PA"]
    assert frame["PatientAge"].tolist()[0] == 34
    assert frame["PatientAge"].isna().tolist() == [False, True, True, False]
    assert frame["hospital"].tolist() == ["north", "south", "north", "north"]
    assert f"{path}: skipped 2 rows with no patient_id or a target other than 0/1 (data rows 3, 4" in caplog.text
    assert "left the age empty in 1 rows with a PatientAge that is no whole number >= 0 (data rows 3" in caplog.text
    assert "1 rows have PatientAge above 120 years (kept, band 60+): 150" in caplog.text


def test_records_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="records file .*none.csv not found"):
        read_records_csv(tmp_path / "none.csv")
    path = tmp_path / "records.csv"
    path.write_text("id,label\na,1\n")
    with pytest.raises(ValueError, match=r"records.csv: missing column\(s\) patient_id, target; .*found columns id, label"):
        read_records_csv(path)
    path.write_text("patient_id,target\na,2\n")
    with pytest.raises(ValueError, match="no usable row"):
        read_records_csv(path)


def _write_rsna(folder, *, headers=True):
    (folder / RSNA_LABELS_FILE).write_text(
        "patientId,x,y,width,height,Target\n"
        "p1,10,20,30,40,1\n"
        "p1,50,60,70,80,1\n"
        "p2,,,,,0\n"
        "p3,,,,,0\n"
        "p4,,,,,0\n"
    )
    (folder / RSNA_CLASS_FILE).write_text(
        "patientId,class\np1,Lung Opacity\np1,Lung Opacity\np2,Normal\np4,Lung Opacity\n"
    )
    if headers:
        pd.DataFrame(
            {"PatientID": ["p1", "p2", "p4"], "ViewPosition": ["AP", "PA", "PA"],
             "PatientSex": ["F", "M", "M"], "PatientAge": [61, 7, 40], "Modality": "CR"}
        ).to_csv(folder / RSNA_HEADERS_FILE, compression="gzip")


def test_rsna_folder_one_row_per_patient(tmp_path, caplog):
    _write_rsna(tmp_path)
    with caplog.at_level(logging.WARNING):
        frame = rsna_metadata_frame(tmp_path)
    assert frame["patient_id"].tolist() == ["p1", "p2", "p3", "p4"]
    assert frame["target"].tolist() == [1, 0, 0, 0]
    assert frame["class_name"].tolist() == ["Lung Opacity", "Normal", "", "Lung Opacity"]
    assert frame["ViewPosition"].tolist() == ["AP", "PA", "", "PA"]
    assert frame["PatientAge"].tolist()[:2] == [61, 7]
    assert pd.isna(frame["PatientAge"].iloc[2])
    assert "1 of 4 labelled patients have no class row (first: p3)" in caplog.text
    assert "1 patients have a class that disagrees with their Target (first: p4)" in caplog.text
    assert "1 of 4 labelled patients have no header row" in caplog.text


def test_rsna_folder_without_headers(tmp_path):
    _write_rsna(tmp_path, headers=False)
    frame = rsna_metadata_frame(tmp_path)
    assert list(frame.columns) == ["patient_id", "target", "class_name"]


def test_rsna_folder_without_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage_2_train_labels.csv not found"):
        rsna_metadata_frame(tmp_path)


def test_rsna_metadata_real_counts(rsna_metadata):
    frame = rsna_metadata_frame(rsna_metadata)
    assert len(frame) == 26684
    assert frame["patient_id"].is_unique
    assert int(frame["target"].sum()) == 6012
    missing_class = frame.loc[frame["class_name"] == "", "patient_id"].tolist()
    assert missing_class == ["489a175a-4c5c-4b7f-8fdc-cd8514404dbe"]
    assert set(frame["ViewPosition"]) == {"AP", "PA"}
    assert frame["PatientAge"].notna().all()
