"""Manifest files: round trip, validation errors naming file and column, accessors."""

import json

import numpy as np
import pandas as pd
import pytest

from common.sites import (
    HOLDOUT_SITE,
    partition,
    read_manifest,
    read_manifest_sidecar,
    site_ids,
    site_sizes,
    site_style,
    write_manifest,
)
from test_sites_partition import make_records


@pytest.fixture(scope="module")
def shifted():
    return partition(make_records(400, seed=3, max_images=2), setup="scanner-shift", num_sites=3, seed=9, holdout_fraction=0.1)


@pytest.fixture(scope="module")
def written(shifted, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "sites.csv"
    files = write_manifest(shifted, path, source="synthetic")
    return files


def test_manifest_round_trips(shifted, written):
    pd.testing.assert_frame_equal(read_manifest(written.manifest), shifted.manifest)


def test_summary_and_sidecar_beside_manifest(shifted, written):
    assert written.summary.name == "sites.summary.csv"
    assert written.sidecar.name == "sites.json"
    summary = pd.read_csv(written.summary)
    pd.testing.assert_frame_equal(summary, shifted.summary, check_dtype=False)
    sidecar = read_manifest_sidecar(written.manifest)
    assert sidecar["settings"] == json.loads(json.dumps(shifted.settings.to_dict()))
    assert sidecar["settings"]["seed"] == 9
    assert sidecar["settings"]["setup"] == "scanner-shift"
    assert sidecar["source"] == "synthetic"
    assert sidecar["num_sites"] == 3
    assert sidecar["images"] == len(shifted.manifest)


def test_bare_manifest_frame_writes_summary(shifted, tmp_path):
    files = write_manifest(shifted.manifest, tmp_path / "bare.csv")
    assert read_manifest_sidecar(files.manifest)["settings"] is None
    summary = pd.read_csv(files.summary)
    assert summary["images"].tolist() == shifted.summary["images"].tolist()
    assert "sample_rate" not in summary.columns


def test_write_rejects_non_csv_path(shifted, tmp_path):
    with pytest.raises(ValueError, match="must end in .csv"):
        write_manifest(shifted, tmp_path / "sites.txt")


def test_site_accessors(shifted):
    manifest = shifted.manifest
    train = site_ids(manifest, 1, "train")
    expected = manifest.loc[(manifest["site"] == 1) & (manifest["split"] == "train"), "patient_id"].unique()
    assert train == list(expected)
    assert len(train) == len(set(train))
    assert site_ids(manifest, HOLDOUT_SITE, "holdout") == list(
        manifest.loc[manifest["split"] == "holdout", "patient_id"].unique()
    )
    sizes = site_sizes(manifest)
    assert sizes == {s: int(shifted.summary.set_index("site").loc[s, "train"]) for s in range(3)}
    assert sum(site_sizes(manifest, None).values()) == int((manifest["site"] >= 0).sum())
    assert site_style(manifest, 2) == shifted.styles[2]
    assert site_style(manifest, HOLDOUT_SITE) is None


def test_site_accessor_errors(shifted):
    with pytest.raises(ValueError, match=r"site 5 is not in the manifest; its sites are \[-1, 0, 1, 2\]"):
        site_ids(shifted.manifest, 5, "train")
    with pytest.raises(ValueError, match="split must be one of train, val, test, holdout; got 'trian'"):
        site_ids(shifted.manifest, 0, "trian")
    with pytest.raises(ValueError, match="split must be one of train, val, test or None"):
        site_sizes(shifted.manifest, "holdout")


def test_site_style_none_without_styles():
    manifest = partition(make_records(200), setup="iid", num_sites=2, seed=0).manifest
    assert site_style(manifest, 0) is None


def _corrupt(written, tmp_path, change):
    lines = written.manifest.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    header, rows = change(header, rows)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def _set(column, row, value):
    def change(header, rows):
        rows[row][header.index(column)] = value
        return header, rows
    return change


def _set_site(column, site, value):
    def change(header, rows):
        for row in rows:
            if row[header.index("site")] == site:
                row[header.index(column)] = value
        return header, rows
    return change


def _drop(column):
    def change(header, rows):
        index = header.index(column)
        return [h for i, h in enumerate(header) if i != index], [[v for i, v in enumerate(r) if i != index] for r in rows]
    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_drop("split"), "missing column.s. split; a manifest needs patient_id, site, split, target"),
        (_set("split", 2, "trian"), "column 'split', data row 3: value 'trian' is not one of train, val, test, holdout"),
        (_set("site", 4, "x"), "column 'site', data row 5: value 'x' is not an integer"),
        (_set("site", 4, ""), "column 'site', data row 5: value '' is not an integer"),
        (_set("target", 0, "2"), "column 'target', data row 1: value 2 is not 0 or 1"),
        (_set("site", -1, "0"), "column 'site', data row .*: value 0 is invalid: held-out rows have site -1"),
        (_set("PatientAge", 1, "forty"), "column 'PatientAge', data row 2: value 'forty' is not an integer"),
        (_set("style_gamma", 0, "high"), "column 'style_gamma', data row 1: value 'high' is not a number"),
        (_set("style_gamma", 0, "0.5"), "site 0 has 2 different or incomplete styles"),
        (_set_site("style_contrast", "0", "-1"), "site 0: invalid style: contrast must be > 0; got -1.0"),
        (_drop("style_blur_sigma"), "style columns come together; missing style_blur_sigma"),
        (_set("patient_id", 0, ""), "column 'patient_id', data row 1: value '' is empty"),
        (_set_site("site", "1", "3"), r"must number the sites 0..K-1 without gaps; found \[0, 2, 3\]"),
    ],
)
def test_read_manifest_rejects_bad_files(written, tmp_path, change, message):
    path = _corrupt(written, tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        read_manifest(path)
    assert str(path) in str(error.value)


def test_read_manifest_rejects_patient_in_two_places(written, tmp_path):
    def move_one_image(header, rows):
        first = rows[0]
        twin = next(r for r in rows[1:] if r[0] == first[0])  # the second image of that patient
        twin[header.index("split")] = "test" if first[header.index("split")] != "test" else "val"
        return header, rows

    frame = read_manifest(written.manifest)
    assert frame["patient_id"].iloc[0] == frame["patient_id"].iloc[1]  # test premise: two images
    with pytest.raises(ValueError, match=r"patient 'p\d+' appears in site 0/\w+ and site 0/\w+"):
        read_manifest(_corrupt(written, tmp_path, move_one_image))


def test_read_manifest_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="create one with `dpfedseg sites"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        read_manifest(tmp_path / "empty.csv")


def test_read_manifest_keeps_unknown_columns(written, tmp_path):
    frame = pd.read_csv(written.manifest, dtype=str, keep_default_na=False)
    frame["note"] = "x"
    frame.to_csv(tmp_path / "extra.csv", index=False)
    manifest = read_manifest(tmp_path / "extra.csv")
    assert manifest.columns[-1] == "note"
    assert manifest["site"].dtype == np.int64
