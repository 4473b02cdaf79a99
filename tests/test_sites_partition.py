"""Site partitions on synthetic records: coverage, determinism, every setup, every guard rail."""

import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from common.sites import AGE_BANDS, HOLDOUT_SITE, SiteSettings, partition
from common.sites.setups import assign_sites, attribute_counts
from common.style import AcquisitionStyle

CLASSES_NEGATIVE = ("Normal", "No Lung Opacity / Not Normal")


def make_records(
    num_patients: int,
    *,
    seed: int = 0,
    positive_rate: float = 0.25,
    ap_share: float = 0.45,
    max_images: int = 1,
) -> pd.DataFrame:
    """Return a records frame of random patients (``max_images > 1``: 1..max images each)."""
    rng = np.random.default_rng(seed)
    target = (rng.random(num_patients) < positive_rate).astype(int)
    negative_class = rng.choice(CLASSES_NEGATIVE, num_patients)
    frame = pd.DataFrame(
        {
            "patient_id": [f"p{i:05d}" for i in range(num_patients)],
            "target": target,
            "class_name": np.where(target == 1, "Lung Opacity", negative_class),
            "ViewPosition": np.where(rng.random(num_patients) < ap_share, "AP", "PA"),
            "PatientSex": rng.choice(["F", "M"], num_patients),
            "PatientAge": rng.integers(1, 95, num_patients),
        }
    )
    if max_images > 1:
        frame = frame.loc[frame.index.repeat(rng.integers(1, max_images + 1, num_patients))]
        frame["image_id"] = frame["patient_id"] + "-" + frame.groupby("patient_id").cumcount().astype(str)
    return frame.reset_index(drop=True)


ALL_SETUPS = [
    ("iid", {}),
    ("label-skew", {"alpha": 1.0}),
    ("quantity-skew", {}),
    ("quantity-skew", {"size_distribution": "power", "power_exponent": 1.5}),
    ("attribute", {"attribute": "ViewPosition"}),
    ("attribute", {"attribute": "PatientSex", "purity": 0.9}),
    ("attribute", {"attribute": "age-band"}),
    ("scanner-shift", {}),
]


@pytest.fixture(scope="module")
def records():
    return make_records(1200, seed=1, max_images=3)


@pytest.mark.parametrize("setup, options", ALL_SETUPS)
def test_partition_covers_every_image_once(records, setup, options):
    result = partition(records, setup=setup, num_sites=4, seed=2, holdout_fraction=0.1, **options)
    manifest = result.manifest
    assert sorted(manifest["image_id"]) == sorted(records["image_id"])
    assert not manifest["image_id"].duplicated().any()
    places = manifest.groupby("patient_id")[["site", "split"]].nunique()
    assert places.max().max() == 1  # one site and one split per patient
    assert set(manifest["site"]) == {HOLDOUT_SITE, 0, 1, 2, 3}
    assert set(manifest.loc[manifest["site"] == HOLDOUT_SITE, "split"]) == {"holdout"}
    assert set(manifest.loc[manifest["site"] >= 0, "split"]) == {"train", "val", "test"}
    summary = result.summary
    assert summary["images"].sum() == len(records)
    assert summary["patients"].sum() == records["patient_id"].nunique()


@pytest.mark.parametrize("setup, options", ALL_SETUPS)
def test_partition_is_deterministic_per_seed(records, setup, options):
    first = partition(records, setup=setup, num_sites=4, seed=7, **options).manifest
    again = partition(records, setup=setup, num_sites=4, seed=7, **options).manifest
    shuffled = records.sample(frac=1.0, random_state=3)
    reordered = partition(shuffled, setup=setup, num_sites=4, seed=7, **options).manifest
    other = partition(records, setup=setup, num_sites=4, seed=8, **options).manifest
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, reordered)
    assert not first[["site", "split"]].equals(other[["site", "split"]])


def test_manifest_columns_and_types(records):
    manifest = partition(records, setup="scanner-shift", num_sites=3, seed=0).manifest
    assert list(manifest.columns) == [
        "patient_id", "image_id", "site", "split", "target", "class_name", "ViewPosition",
        "PatientSex", "PatientAge", "age_band", "style_contrast", "style_gamma",
        "style_noise_std", "style_blur_sigma",
    ]
    assert manifest["site"].dtype == np.int64
    assert manifest["target"].dtype == np.int64
    assert str(manifest["PatientAge"].dtype) == "Int64"
    assert manifest["style_gamma"].dtype == np.float64


def test_age_bands_follow_the_named_constant(records):
    manifest = partition(records, setup="iid", num_sites=2, seed=0).manifest
    for name, low, high in AGE_BANDS:
        ages = manifest.loc[manifest["age_band"] == name, "PatientAge"]
        assert ages.min() >= low
        assert high is None or ages.max() < high


def test_iid_sites_are_equal_and_stratified():
    frame = make_records(4001, seed=4)
    summary = partition(frame, setup="iid", num_sites=4, seed=1).summary
    assert summary["images"].max() - summary["images"].min() <= 1
    positives = summary["positives"].to_numpy()
    assert positives.max() - positives.min() <= 1


def test_splits_follow_ratios_and_labels():
    frame = make_records(2000, seed=5, positive_rate=0.2)
    summary = partition(frame, setup="iid", num_sites=2, seed=3, split_ratios=(0.6, 0.3, 0.1)).summary
    manifest = partition(frame, setup="iid", num_sites=2, seed=3, split_ratios=(0.6, 0.3, 0.1)).manifest
    for row in summary.itertuples():
        assert (row.train, row.val, row.test) == (600, 300, 100)
    for (site, split), group in manifest.groupby(["site", "split"]):
        site_rate = summary.loc[summary["site"] == site, "positive_rate"].item()
        # Stratified: each split's positives are the site's rate times its size, within 1.5.
        assert abs(group["target"].sum() - site_rate * len(group)) <= 1.5, (site, split)


def test_holdout_is_global_and_stratified():
    frame = make_records(2000, seed=6, positive_rate=0.3)
    result = partition(frame, setup="iid", num_sites=3, seed=0, holdout_fraction=0.25)
    holdout = result.manifest[result.manifest["split"] == "holdout"]
    assert len(holdout) == 500
    assert (holdout["site"] == HOLDOUT_SITE).all()
    assert abs(holdout["target"].sum() - 0.25 * frame["target"].sum()) <= 1
    assert result.summary["site"].tolist() == [0, 1, 2, HOLDOUT_SITE]


def _label_skew_rates(frame, *, alpha, num_sites, seed):
    summary = partition(frame, setup="label-skew", num_sites=num_sites, seed=seed, alpha=alpha, min_site_size=1).summary
    return summary["positive_rate"].to_numpy()


def test_label_skew_large_alpha_approaches_iid():
    """With p_c ~ Dir(alpha 1_K) per class, site k's positive rate is about
    r0 + r0 (1 - r0) (d1 - d0) with sd(d) = sqrt((K - 1) / (K alpha + 1)), so
    sd(rate) = r0 (1 - r0) sqrt(2 (K - 1) / (K alpha + 1)). Tolerance: 5 sd per site."""
    frame = make_records(10000, seed=7, positive_rate=0.25).drop(columns="class_name")
    rate = frame["target"].mean()
    num_sites, alpha = 5, 1e4
    sd = rate * (1 - rate) * math.sqrt(2 * (num_sites - 1) / (num_sites * alpha + 1))
    tolerance = 5 * sd
    for seed in range(3):
        deviation = np.abs(_label_skew_rates(frame, alpha=alpha, num_sites=num_sites, seed=seed) - rate)
        assert deviation.max() <= tolerance, (seed, deviation, tolerance)
    # A small alpha breaks the same bound: the test can fail.
    small = np.abs(_label_skew_rates(frame, alpha=0.3, num_sites=num_sites, seed=0) - rate)
    assert small.max() > 10 * tolerance


def test_label_skew_share_variance_matches_dirichlet():
    """Each class's share at a site is Beta(alpha, (K - 1) alpha), with variance
    (1/K)(1 - 1/K) / (K alpha + 1). 100 seeds x 2 classes x 4 sites estimate it within 20%,
    where the estimate's relative sd is about 8%."""
    units = pd.DataFrame({"label": np.repeat([1, 0], [800, 1200])})
    num_sites, alpha = 4, 2.0
    shares = []
    for seed in range(100):
        settings = SiteSettings(setup="label-skew", num_sites=num_sites, seed=seed, alpha=alpha)
        sites = assign_sites(units, settings).sites
        for label, total in ((1, 800), (0, 1200)):
            shares.append(np.bincount(sites[units["label"] == label], minlength=num_sites) / total)
    expected = (1 / num_sites) * (1 - 1 / num_sites) / (num_sites * alpha + 1)
    assert np.var(np.concatenate(shares)) == pytest.approx(expected, rel=0.2)


def test_label_skew_uses_classes_when_present():
    frame = make_records(3000, seed=9)
    manifest = partition(frame, setup="label-skew", num_sites=3, seed=4, alpha=0.2, min_site_size=1).manifest
    shares = pd.crosstab(manifest["site"], manifest["class_name"], normalize="index")
    # Both negative classes are skewed separately: their ratio differs strongly between sites.
    ratio = shares["Normal"] / shares["No Lung Opacity / Not Normal"]
    assert ratio.max() / ratio.min() > 3


def test_quantity_skew_power_sizes():
    frame = make_records(1050, seed=10)
    summary = partition(
        frame, setup="quantity-skew", num_sites=3, seed=0, size_distribution="power",
        power_exponent=1.0, min_site_size=50,
    ).summary
    # 900 spare patients over shares 1 : 1/2 : 1/3 -> 490.9, 245.5, 163.6 -> 491, 245, 164.
    assert sorted(summary["images"] - 50, reverse=True) == [491, 245, 164]


def test_quantity_skew_keeps_minimum_and_positive_rate():
    frame = make_records(3000, seed=11, positive_rate=0.3)
    summary = partition(frame, setup="quantity-skew", num_sites=6, seed=2, alpha=0.2, min_site_size=40).summary
    assert summary["images"].min() >= 40
    assert summary["images"].sum() == 3000
    assert summary["images"].max() > 4 * summary["images"].min()
    expected = summary["images"] * frame["target"].mean()
    assert np.all(np.abs(summary["positives"] - expected) <= 1.0)


def test_quantity_skew_too_few_patients():
    with pytest.raises(ValueError, match="100 patients cannot fill 6 sites of at least 20 patients"):
        partition(make_records(100), setup="quantity-skew", num_sites=6, seed=0)


@pytest.mark.parametrize(
    "attribute, column, num_sites, purity",
    [("ViewPosition", "ViewPosition", 4, 0.8), ("PatientSex", "PatientSex", 3, 0.95), ("age-band", "age_band", 6, 0.7)],
)
def test_attribute_sites_reach_purity(attribute, column, num_sites, purity):
    frame = make_records(12000, seed=12)
    result = partition(frame, setup="attribute", attribute=attribute, num_sites=num_sites, purity=purity, seed=1)
    manifest = result.manifest
    values = sorted(manifest[column].unique(), key=str)
    for site in range(num_sites):
        rows = manifest[manifest["site"] == site]
        dominant = result.dominant[site]
        assert dominant == values[site % len(values)]
        # Column rounding moves a site by at most V patients.
        assert abs((rows[column] == dominant).mean() - purity) <= len(values) / len(rows)
    # Every image is used once, so the union keeps the real value counts exactly.
    assert manifest[column].value_counts().sort_index().tolist() == (
        pd.Series(result.manifest[column]).value_counts().sort_index().tolist()
    )


def test_attribute_counts_solve_the_exact_system():
    counts = attribute_counts(np.array([450, 550]), num_sites=2, purity=0.8)
    # S_AP = (0.8 * 450 - 0.2 * 550) / 0.6 = 416.67: 333.3 AP + 83.3 PA at site 0.
    # S_PA = 583.33: 116.7 AP + 466.7 PA at site 1.
    assert counts.tolist() == [[333, 83], [117, 467]]
    assert counts.sum(axis=0).tolist() == [450, 550]


def test_attribute_infeasible_purity_names_the_lowest():
    frame = make_records(2000, seed=13, ap_share=0.1)
    ap_share = (frame["ViewPosition"] == "AP").mean()
    with pytest.raises(ValueError, match=r"raise --purity to at least (\d\.\d+)") as error:
        partition(frame, setup="attribute", attribute="ViewPosition", num_sites=2, purity=0.6, seed=0)
    lowest = float(re.search(r"at least (\d\.\d+)", str(error.value)).group(1))
    # For two values the lowest purity is the share of the more common value.
    assert lowest == pytest.approx(1 - ap_share, abs=1e-3)
    options = {"setup": "attribute", "attribute": "ViewPosition", "num_sites": 2, "seed": 0}
    # The reported purity is feasible (its AP site is nearly empty, hence the size error);
    # one step below it is not.
    with pytest.raises(ValueError, match="below the minimum site size"):
        partition(frame, purity=lowest, **options)
    with pytest.raises(ValueError, match="is infeasible"):
        partition(frame, purity=lowest - 0.001, **options)
    feasible = partition(frame, purity=lowest + 0.02, **options)
    assert feasible.summary["images"].sum() == len(frame)


def test_attribute_needs_a_site_per_value():
    with pytest.raises(ValueError, match="--sites must be at least 4; got 3"):
        partition(make_records(2000), setup="attribute", attribute="age-band", num_sites=3, seed=0)


def test_attribute_needs_two_values():
    frame = make_records(200, ap_share=0.0)
    with pytest.raises(ValueError, match=r"attribute 'ViewPosition' has the single value \['PA'\]"):
        partition(frame, setup="attribute", attribute="ViewPosition", num_sites=2, seed=0)


def test_attribute_skips_rows_without_value(caplog):
    frame = make_records(400, seed=14)
    frame.loc[:9, "ViewPosition"] = ""
    with caplog.at_level(logging.WARNING):
        manifest = partition(frame, setup="attribute", attribute="ViewPosition", num_sites=2, seed=0).manifest
    assert len(manifest) == 390
    assert "skipped 10 rows with no ViewPosition value" in caplog.text


def test_attribute_missing_column():
    frame = make_records(200).drop(columns="PatientAge")
    with pytest.raises(ValueError, match="needs the column 'age_band', which is missing"):
        partition(frame, setup="attribute", attribute="age-band", num_sites=4, seed=0)


def test_scanner_styles_seeded_per_site():
    first = partition(make_records(300, seed=1), setup="scanner-shift", num_sites=3, seed=5)
    second = partition(make_records(900, seed=2), setup="scanner-shift", num_sites=3, seed=5)
    assert first.styles == second.styles
    assert len(set(first.styles.values())) == 3
    for site, style in first.styles.items():
        assert isinstance(style, AcquisitionStyle)
        assert style.magnification == 1.0
        rows = first.manifest[first.manifest["site"] == site]
        assert rows["style_contrast"].unique().tolist() == [style.contrast]
        assert rows["style_blur_sigma"].unique().tolist() == [style.blur_sigma]


def test_scanner_shift_strength_zero_is_neutral():
    result = partition(make_records(300), setup="scanner-shift", num_sites=2, seed=0, style_strength=0.0)
    assert all(style.is_neutral for style in result.styles.values())


def _column_frame():
    frame = make_records(300, seed=15)
    frame["hospital"] = np.array(["10", "2", "1"])[np.arange(300) % 3]
    return frame


def test_column_setup_numbers_sites_in_sorted_order():
    result = partition(_column_frame(), setup="column", site_column="hospital", seed=0)
    manifest = result.manifest
    assert result.site_names == ("1", "2", "10")
    in_sites = manifest[manifest["site"] >= 0]
    assert (in_sites["site_name"] == in_sites["site"].map({0: "1", 1: "2", 2: "10"})).all()
    assert result.summary["images"].tolist() == [100, 100, 100]


def test_column_setup_rejects_patient_in_two_sites():
    frame = _column_frame()
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "hospital": "2"}
    with pytest.raises(ValueError, match="patient 'p00000' appears in sites '10', '2' of column 'hospital'"):
        partition(frame, setup="column", site_column="hospital", seed=0)


def test_column_setup_rejects_wrong_site_count():
    with pytest.raises(ValueError, match="--sites 4 does not match the 3 sites of column 'hospital'"):
        partition(_column_frame(), setup="column", site_column="hospital", num_sites=4, seed=0)


def test_column_setup_skips_rows_without_site(caplog):
    frame = _column_frame()
    frame.loc[:5, "hospital"] = ""
    with caplog.at_level(logging.WARNING):
        manifest = partition(frame, setup="column", site_column="hospital", seed=0).manifest
    assert len(manifest) == 294
    assert "skipped 6 rows with no hospital value" in caplog.text


def test_min_site_size_error_message():
    frame = make_records(600, seed=16)
    options = {"setup": "label-skew", "num_sites": 8, "seed": 3, "alpha": 0.1}
    sizes = partition(frame, min_site_size=1, **options).summary.set_index("site")["images"]
    assert sizes.min() < 20
    with pytest.raises(ValueError) as error:
        partition(frame, **options)
    message = str(error.value)
    named = {int(site): int(size) for site, size in re.findall(r"site (\d+) has (\d+)", message)}
    assert named == {site: size for site, size in sizes.items() if size < 20}
    assert "below the minimum site size 20" in message
    assert "raise --alpha (now 0.1)" in message
    assert "--min-site-size" in message


@pytest.mark.parametrize(
    "setup, options, fix",
    [
        ("iid", {}, "use fewer --sites (now 30)"),
        ("attribute", {"attribute": "ViewPosition"}, "raise --purity (now 0.8)"),
    ],
)
def test_min_site_size_error_fix_per_setup(setup, options, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        partition(make_records(500), setup=setup, num_sites=30, seed=0, **options)


def test_site_without_training_patient():
    with pytest.raises(ValueError, match="site 0 has no training patient"):
        partition(make_records(4), setup="iid", num_sites=4, seed=0, min_site_size=1, split_ratios=(0.2, 0.4, 0.4))


def test_tiny_poisson_batch_warns(caplog):
    frame = make_records(200, seed=17)
    with caplog.at_level(logging.WARNING, logger="common.sites.summary"):
        result = partition(frame, setup="iid", num_sites=2, seed=0, expected_batch_size=32)
    # 70 training images per site: q = 32/70 = 0.46 > 0.25.
    assert any("site 0: sample_rate q = 32/70 = 0.46" in m for m in result.warnings)
    assert "site 1: sample_rate q = 32/70" in caplog.text
    assert "at least 128 training images" in caplog.text


def test_batch_at_least_site_warns():
    result = partition(make_records(60, seed=17), setup="iid", num_sites=2, seed=0, expected_batch_size=32)
    assert any("every step uses the whole site" in m for m in result.warnings)


def test_expected_batch_below_two_warns():
    result = partition(make_records(400, seed=17), setup="iid", num_sites=2, seed=0, expected_batch_size=1)
    message = next(m for m in result.warnings if "expected Poisson batch" in m)
    # q = 1/140: P(empty batch) = (1 - 1/140)^140 = 0.366.
    assert "site 0: the expected Poisson batch is 1.00 images and 37% of the batches are empty" in message


def test_no_warning_for_healthy_sites():
    assert partition(make_records(2000, seed=18), setup="iid", num_sites=2, seed=0).warnings == ()


def test_validation_without_positive_warns(caplog):
    frame = make_records(400, seed=19, positive_rate=0.0)
    frame.loc[:1, "target"] = 1  # two positives for two sites: none reaches a val split
    with caplog.at_level(logging.WARNING):
        result = partition(frame, setup="iid", num_sites=2, seed=0)
    assert sum("validation images include no positive image" in m for m in result.warnings) == 2
    assert "site 0: its 30 validation images include no positive image" in caplog.text


@pytest.mark.parametrize(
    "setup, fix",
    [("iid", "use fewer --sites"), ("label-skew", "raise --alpha (now 0.5)")],
)
def test_site_without_positive_warns(setup, fix):
    frame = make_records(400, seed=19, positive_rate=0.0)
    result = partition(frame, setup=setup, num_sites=2, seed=0, min_site_size=1)
    message = f"site 0 has no positive image in any split, so Dice on positives cannot be measured there; {fix}"
    assert message in result.warnings


def test_holdout_without_positive_warns():
    frame = make_records(400, seed=20, positive_rate=0.0)
    frame.loc[:3, "target"] = 1
    result = partition(frame, setup="iid", num_sites=2, seed=0, holdout_fraction=0.05)
    assert "the held-out test set (20 images) has no positive image" in result.warnings


def test_records_validation_skips_bad_rows(caplog):
    frame = make_records(300, seed=21)
    frame["target"] = frame["target"].astype(object)
    frame.loc[0, "target"] = 2
    frame.loc[1, "patient_id"] = ""
    with caplog.at_level(logging.WARNING):
        manifest = partition(frame, setup="iid", num_sites=2, seed=0).manifest
    assert len(manifest) == 298
    assert "skipped 2 rows with no patient_id or a target other than 0/1 (data rows 1, 2" in caplog.text


def test_records_missing_columns():
    with pytest.raises(ValueError, match="records: missing column.s. target"):
        partition(pd.DataFrame({"patient_id": ["a"]}), setup="iid", num_sites=1)


def test_settings_accept_numpy_numbers():
    settings = SiteSettings(setup="label-skew", num_sites=np.int64(3), seed=np.int32(2), alpha=np.float32(0.5))
    assert settings.to_dict()["num_sites"] == 3
    assert type(settings.num_sites) is int
    assert type(settings.alpha) is float


@pytest.mark.parametrize(
    "options, message",
    [
        ({"setup": "random"}, "setup must be one of"),
        ({"setup": "iid"}, "needs the number of sites"),
        ({"setup": "iid", "num_sites": 0}, r"sites must lie in \[1, inf\); got 0"),
        ({"setup": "iid", "num_sites": 2.5}, "sites must be an integer; got 2.5"),
        ({"setup": "iid", "num_sites": 2, "seed": -1}, r"seed must lie in \[0, inf\); got -1"),
        ({"setup": "label-skew", "num_sites": 2, "alpha": 0.0}, r"alpha must lie in \(0.0, inf\); got 0.0"),
        ({"setup": "label-skew", "num_sites": 2, "alpha": math.inf}, "alpha must be a finite number"),
        ({"setup": "attribute", "num_sites": 2}, "needs --attribute"),
        ({"setup": "attribute", "num_sites": 2, "attribute": "Sex"}, "attribute must be one of"),
        ({"setup": "attribute", "num_sites": 2, "attribute": "PatientSex", "purity": 0.5}, r"purity must lie in \(0.5, 1.0\]; got 0.5"),
        ({"setup": "attribute", "num_sites": 2, "attribute": "PatientSex", "purity": 1.1}, "purity must lie in"),
        ({"setup": "column"}, "needs --site-column"),
        ({"setup": "quantity-skew", "num_sites": 2, "size_distribution": "zipf"}, "size-distribution must be one of"),
        ({"setup": "quantity-skew", "num_sites": 2, "power_exponent": -1.0}, "power-exponent must lie in"),
        ({"setup": "iid", "num_sites": 2, "split_ratios": (0.7, 0.2, 0.2)}, r"must sum to 1; got \(0.7, 0.2, 0.2\)"),
        ({"setup": "iid", "num_sites": 2, "split_ratios": (0.0, 0.5, 0.5)}, "positive train share"),
        ({"setup": "iid", "num_sites": 2, "split_ratios": (0.5, 0.5)}, "must be 3 numbers"),
        ({"setup": "iid", "num_sites": 2, "holdout_fraction": 1.0}, r"holdout must lie in \[0.0, 1.0\); got 1.0"),
        ({"setup": "iid", "num_sites": 2, "min_site_size": 0}, "min-site-size must lie in"),
        ({"setup": "iid", "num_sites": 2, "expected_batch_size": 0}, "batch-size must lie in"),
        ({"setup": "scanner-shift", "num_sites": 2, "style_strength": -0.1}, "style-strength must lie in"),
        ({"setup": "iid", "num_sites": 2, "seed": None}, "seed must be an integer; got None"),
        ({"setup": "attribute", "num_sites": 2, "attribute": "PatientSex", "purity": "0.9"}, "purity must be a finite number; got '0.9'"),
    ],
)
def test_settings_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        SiteSettings(**options)


@hypothesis_settings(max_examples=25, deadline=None)
@given(
    num_patients=st.integers(1, 60),
    num_sites=st.integers(1, 5),
    setup=st.sampled_from(["iid", "label-skew", "quantity-skew", "scanner-shift"]),
    seed=st.integers(0, 2**16),
    positive_rate=st.floats(0.0, 1.0),
    max_images=st.integers(1, 3),
)
def test_partition_coverage_property(num_patients, num_sites, setup, seed, positive_rate, max_images):
    frame = make_records(num_patients, seed=seed, positive_rate=positive_rate, max_images=max_images)
    try:
        result = partition(frame, setup=setup, num_sites=num_sites, seed=seed, min_site_size=1, holdout_fraction=0.2)
    except ValueError as error:
        # Small inputs may legitimately leave a site empty or without a training patient.
        assert re.search("below the minimum site size|no training patient|cannot fill", str(error))
        return
    manifest = result.manifest
    assert len(manifest) == len(frame)
    assert sorted(manifest["image_id"] if max_images > 1 else manifest["patient_id"]) == sorted(
        frame["image_id"] if max_images > 1 else frame["patient_id"]
    )
    assert manifest.groupby("patient_id")[["site", "split"]].nunique().max().max() == 1
    assert sorted(set(manifest["site"]) - {HOLDOUT_SITE}) == list(range(num_sites))
