"""The ``dpfedseg sites`` command and the partition plot."""

import numpy as np
import pandas as pd
import pytest

from common.sites import partition, read_manifest, read_manifest_sidecar
from simulations.cli import build_parser, main
from simulations.cmd_sites import load_records
from simulations.site_plots import partition_figure
from test_sites_partition import make_records


@pytest.fixture(scope="module")
def records_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "records.csv"
    make_records(300, seed=4).to_csv(path, index=False)
    return path


def _run(argv):
    args = build_parser().parse_args(["sites", *map(str, argv)])
    return args.func(args)


def test_cli_writes_manifest_summary_sidecar_and_plot(records_csv, tmp_path, capsys):
    out = tmp_path / "sites" / "m.csv"
    status = _run([
        records_csv, "--setup", "label-skew", "--sites", "3", "--alpha", "5", "--seed", "1",
        "--out", out, "--split", "0.6,0.2,0.2", "--holdout", "0.1", "--batch-size", "4",
    ])
    assert status == 0
    expected = partition(
        pd.read_csv(records_csv, dtype={"patient_id": str}), setup="label-skew", num_sites=3,
        alpha=5.0, seed=1, split_ratios=(0.6, 0.2, 0.2), holdout_fraction=0.1, expected_batch_size=4,
    )
    pd.testing.assert_frame_equal(read_manifest(out), expected.manifest)
    assert read_manifest_sidecar(out)["settings"] == expected.settings.to_dict()
    assert (tmp_path / "sites" / "m.summary.csv").is_file()
    assert (tmp_path / "sites" / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "site 0" in printed
    assert "holdout" in printed
    assert "positive_rate" in printed


def test_cli_no_plot(records_csv, tmp_path):
    assert _run([records_csv, "--setup", "iid", "--sites", "2", "--out", tmp_path / "m.csv", "--no-plot"]) == 0
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--setup", "iid", "--sites", "2", "--alpha", "1"], "--alpha applies to --setup label-skew or quantity-skew, not iid"),
        (["--setup", "iid", "--sites", "2", "--purity", "0.9"], "--purity applies to --setup attribute, not iid"),
        (["--setup", "label-skew", "--sites", "2", "--site-column", "x"], "--site-column applies to --setup column"),
        (["--setup", "quantity-skew", "--sites", "2", "--size-distribution", "power", "--alpha", "1"], "--alpha applies to --size-distribution dirichlet"),
        (["--setup", "quantity-skew", "--sites", "2", "--power-exponent", "2"], "--power-exponent applies to --size-distribution power"),
        (["--setup", "iid", "--sites", "2", "--split", "0.7,0.3"], "--split must be three numbers train,val,test"),
        (["--setup", "iid", "--sites", "2", "--split", "a,b,c"], "--split must be three numbers"),
        (["--setup", "iid", "--sites", "2", "--split", "0.7,0.2,0.2"], "split ratios must sum to 1"),
        (["--setup", "iid", "--sites", "0"], r"sites must lie in \[1, inf\); got 0"),
        (["--setup", "iid", "--sites", "2", "--holdout", "1.5"], "holdout must lie in"),
        (["--setup", "iid", "--sites", "2", "--batch-size", "0"], "batch-size must lie in"),
        (["--setup", "iid"], "needs the number of sites"),
        (["--setup", "attribute", "--sites", "2"], "needs --attribute"),
        (["--setup", "column"], "needs --site-column"),
    ],
)
def test_cli_rejects_bad_options(records_csv, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _run([records_csv, *options, "--out", tmp_path / "m.csv"])
    assert not (tmp_path / "m.csv").exists()


def test_cli_rejects_bad_paths(records_csv, tmp_path):
    with pytest.raises(ValueError, match="--out must be a .csv path"):
        _run([records_csv, "--setup", "iid", "--sites", "2", "--out", tmp_path / "m.txt"])
    with pytest.raises(FileNotFoundError, match="DATA .*nowhere not found"):
        _run([tmp_path / "nowhere", "--setup", "iid", "--sites", "2", "--out", tmp_path / "m.csv"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .csv records table"):
        _run([tmp_path / "notes.txt", "--setup", "iid", "--sites", "2", "--out", tmp_path / "m.csv"])


def test_cli_exit_status(records_csv, tmp_path):
    out = tmp_path / "m.csv"
    assert main(["sites", str(records_csv), "--setup", "iid", "--sites", "40", "--out", str(out)]) == 1
    assert not out.exists()
    with pytest.raises(SystemExit) as error:
        main(["sites", str(records_csv), "--setup", "shuffled", "--out", str(out)])
    assert error.value.code == 2


def test_load_records_reads_rsna_metadata_folder(rsna_metadata):
    frame, source = load_records(rsna_metadata)
    assert source == str(rsna_metadata)
    assert len(frame) == 26684


def test_load_records_reads_image_folder(rsna_sample):
    frame, _ = load_records(rsna_sample)
    assert len(frame) == 16
    assert int(frame["target"].sum()) == 5
    manifest = partition(frame, setup="iid", num_sites=2, seed=0, min_site_size=8).manifest
    assert sorted(manifest["patient_id"]) == sorted(frame["patient_id"])


def test_plot_panels_show_summary_values():
    result = partition(make_records(600, seed=5), setup="attribute", attribute="ViewPosition", num_sites=2, seed=0, holdout_fraction=0.1)
    summary = result.summary
    figure = partition_figure(summary, title="test")
    axes = figure.get_axes()
    # Sizes, positive rate, then ViewPosition, PatientSex, age_band and class_name mixes.
    assert [axis.get_title() for axis in axes] == [
        "images per site", "positive rate (images with a lung opacity)", "ViewPosition mix",
        "PatientSex mix", "age_band mix", "class_name mix",
    ]
    train_bars = axes[0].containers[0]
    assert [bar.get_height() for bar in train_bars] == summary["train"].tolist()
    rates = [bar.get_height() for bar in axes[1].containers[0]]
    assert np.allclose(rates, summary["positive_rate"])
    ap_bars = [bar.get_height() for bar in axes[2].containers[0]]
    assert np.allclose(ap_bars, summary["ViewPosition=AP"])
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0\nAP", "1\nPA", "holdout"]
