"""``dpfedseg data synth`` and ``dpfedseg data inspect`` through the real command parser."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from common.data.rsna import IMAGES_DIR, LABELS_FILE
from common.data.synth import SITES_FILE, synthesize
from common.sites.frames import AGE_BANDS, AGE_COLUMN, age_bands, rsna_metadata_frame
from simulations.cli import main


def test_synth_then_inspect_json(tmp_path, capsys):
    out = tmp_path / "synthetic"
    status = main(["data", "synth", str(out), "--images", "6", "--seed", "3", "--size", "64",
                   "--positive-rate", "0.5"])
    assert status == 0
    assert "wrote 6 images" in capsys.readouterr().out
    assert len(list((out / IMAGES_DIR).glob("*.dcm"))) == 6
    labels = pd.read_csv(out / LABELS_FILE)

    assert main(["data", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "rsna"
    assert summary["images"] == 6
    assert summary["positives"] == int(labels.groupby("patientId")["Target"].max().sum())
    assert summary["boxes"] == int(labels["Target"].sum())
    assert summary["decode_failures"] == 0
    assert summary["modality"] == {"CR": 6}
    assert sum(summary["view_position"].values()) == 6
    assert summary["would_load"] is True
    assert summary["issues"] == []


def test_inspect_table_of_real_sample(rsna_sample, capsys):
    assert main(["data", "inspect", str(rsna_sample), "--no-decode"]) == 0
    text = capsys.readouterr().out
    assert "16  (positive 5, negative 11)" in text
    assert "boxes             10  (label rows 21)" in text
    assert "Lung Opacity 5 (31%), No Lung Opacity / Not Normal 7 (44%), Normal 4 (25%)" in text
    assert "AP 6 (38%), PA 10 (62%)" in text
    assert "not checked (--no-decode)" in text


def test_synth_with_site_styles(tmp_path, capsys):
    out = tmp_path / "sites"
    status = main(["data", "synth", str(out), "--images", "4", "--seed", "1", "--size", "32",
                   "--sites", "2", "--site-styles"])
    assert status == 0
    sites = pd.read_csv(out / SITES_FILE)
    assert list(sites["site"]) == [0, 1, 0, 1]
    summary = json.loads((out / "synth_summary.json").read_text())
    assert len(summary["site_styles"]) == 2
    assert summary["site_styles"][0] != summary["site_styles"][1]


def test_site_styles_need_sites(tmp_path, caplog):
    status = main(["data", "synth", str(tmp_path / "x"), "--images", "2", "--seed", "1",
                   "--site-styles"])
    assert status == 1
    assert "--site-styles needs --sites" in caplog.text


def test_inspect_wrong_folder_fails_clearly(tmp_path, caplog):
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "contains no dataset" in caplog.text
    assert "stage_2_train_labels.csv" in caplog.text


def test_inspect_labels_only_folder(rsna_metadata, capsys):
    assert main(["data", "inspect", str(rsna_metadata), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 26_684
    assert summary["labels_only"] is True
    assert summary["image_files_found"] is None
    assert summary["positives"] == 6_012
    assert summary["boxes"] == 9_555
    assert summary["label_mismatches"]["missing_class"] == 1
    assert summary["skipped"]["missing_image"] == 0
    assert summary["decode_failures"] is None
    assert summary["would_load"] is None


def test_inspect_age_bands_match_sites(rsna_metadata, capsys):
    """``data inspect`` and site partitions put the same patients in the same age bands."""
    assert main(["data", "inspect", str(rsna_metadata), "--json"]) == 0
    ages = json.loads(capsys.readouterr().out)["age"]
    bands = age_bands(rsna_metadata_frame(rsna_metadata)[AGE_COLUMN])
    expected = bands.replace("", "unknown").value_counts().to_dict()
    assert set(ages) <= {name for name, _, _ in AGE_BANDS} | {"unknown"}
    assert ages == expected
    assert sum(ages.values()) == 26_684


@pytest.fixture
def labels_only_folder(tmp_path):
    """A synthetic RSNA folder of 5 images whose image folder was deleted afterwards."""
    root = tmp_path / "labels-only"
    synthesize(root, images=5, seed=2, image_size=32, positive_rate=0.4)
    shutil.rmtree(root / IMAGES_DIR)
    return root


def test_inspect_labels_only_json(labels_only_folder, capsys, caplog):
    assert main(["data", "inspect", str(labels_only_folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels_only"] is True
    assert summary["images"] == 5
    assert summary["image_files_found"] is None
    assert summary["skipped"]["missing_image"] == 0
    assert summary["label_mismatches"]["missing_image"] == 0
    assert [i for i in summary["issues"] if i["kind"] == "missing_image"] == []
    assert summary["failed_image_fraction"] is None
    assert summary["would_load"] is None
    assert "inspecting the label files only" in caplog.text
    assert "DICOM is missing" not in caplog.text


def test_inspect_labels_only_table(labels_only_folder, capsys):
    assert main(["data", "inspect", str(labels_only_folder)]) == 0
    text = capsys.readouterr().out
    assert "image files       not checked (label files only, no image folder)" in text
    assert "decode failures   not checked (label files only, no image folder)" in text
    assert "skipped           none" in text
    assert "failure share     label rows 0.0%; images not checked, so no load verdict" in text
    assert "image files found" not in text
    assert "missing_image" not in text
    assert "loads" not in text


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--images", "0", "--images must lie in [1, inf); got 0"),
        ("--seed", "-1", "--seed must lie in [0, inf); got -1"),
        ("--size", "16", "--size must lie in [32, inf); got 16"),
        ("--sites", "-1", "--sites must lie in [0, inf); got -1"),
        ("--positive-rate", "nan", "--positive-rate must lie in [0.0, 1.0]; got nan"),
        ("--positive-rate", "1.5", "--positive-rate must lie in [0.0, 1.0]; got 1.5"),
    ],
)
def test_synth_error_names_flag(tmp_path, caplog, flag, value, message):
    out = tmp_path / "synthetic"
    arguments = ["data", "synth", str(out), "--images", "2", "--seed", "1", "--size", "32"]
    assert main([*arguments, flag, value]) == 1
    assert message in caplog.text
    assert not out.exists()


def test_inspect_bad_failure_fraction_names_flag(labels_only_folder, caplog):
    arguments = ["data", "inspect", str(labels_only_folder), "--max-failure-fraction", "nan"]
    assert main(arguments) == 1
    assert "--max-failure-fraction must lie in [0.0, 1.0]; got nan" in caplog.text


def test_synth_one_image_is_singular(tmp_path, capsys):
    out = tmp_path / "one"
    arguments = ["data", "synth", str(out), "--images", "1", "--seed", "4", "--size", "32",
                 "--positive-rate", "0"]
    assert main(arguments) == 0
    assert "wrote 1 image (0 positive, 0 boxes, 32 px)" in capsys.readouterr().out
