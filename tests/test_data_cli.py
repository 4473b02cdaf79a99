"""``dpfedseg data synth`` and ``dpfedseg data inspect`` through the real command parser."""

from __future__ import annotations

import json

import pandas as pd

from common.data.rsna import IMAGES_DIR, LABELS_FILE
from common.data.synth import SITES_FILE
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
    assert summary["image_files_found"] == 0
    assert summary["positives"] == 6_012
    assert summary["boxes"] == 9_555
    assert summary["label_mismatches"]["missing_class"] == 1
    assert summary["skipped"]["missing_image"] == 26_684
    assert summary["decode_failures"] is None
