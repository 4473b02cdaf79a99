"""Partition a records frame into simulated hospital sites with patient-level splits."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from common.sites.columns import AGE_COLUMN, COLUMN_ORDER, STYLE_COLUMNS
from common.sites.frames import AGE_BAND_COLUMN, age_bands, clean_text, report_rows, validate_records
from common.sites.manifest import Partition, normalize_manifest
from common.sites.settings import ATTRIBUTES, HOLDOUT_SITE, HOLDOUT_SPLIT, SPLITS, SiteSettings
from common.sites.setups import SiteAssignment, assign_sites, scanner_styles
from common.sites.splits import holdout_mask, split_site
from common.sites.summary import check_min_site_size, guard_rail_warnings, summarize
from common.text import counted

log = logging.getLogger(__name__)

_SPLIT_ORDER = {name: rank for rank, name in enumerate((*SPLITS, HOLDOUT_SPLIT))}


def partition(frame: pd.DataFrame, *, setup: str, **options) -> Partition:
    """Split the records of ``frame`` into sites, each with patient-level splits.

    ``options`` are the keyword fields of :class:`~common.sites.settings.SiteSettings`
    (``num_sites``, ``seed``, ``alpha``, ``min_site_size``, ``attribute``, ``purity``,
    ``size_distribution``, ``power_exponent``, ``site_column``, ``split_ratios``,
    ``holdout_fraction``, ``expected_batch_size``, ``style_strength``). Setups:

    - ``iid``: equal sites with equal positive rates (stratified random allocation).
    - ``label-skew``: each class is split over the sites by ``Dirichlet(alpha)`` shares;
      classes are ``class_name`` (the 3 RSNA classes) when present, else the target.
    - ``quantity-skew``: sizes are ``min_site_size`` plus Dirichlet or power-law shares of
      the rest; positive rates stay equal.
    - ``attribute``: site ``k`` is dominated by value ``k mod V`` of the attribute
      (values sorted). The mixing parameter is ``purity`` (default 0.8): the share of a
      site's patients that carry its dominant value. The other ``1 - purity`` follow the
      global mix of the other values. Purity is exact up to rounding by patients, and
      counted in patients (equal to images when each patient has one image).
    - ``scanner-shift``: ``iid`` sites plus one acquisition style per site, drawn from
      ``(seed, site)`` and applied at load time.
    - ``column``: the sites are the distinct values of ``site_column``, numbered in sorted
      order; the names are kept in ``site_name``.

    Before any site is formed, ``holdout_fraction`` of the patients (stratified by
    label) become the global test set (site -1, split ``holdout``). Within each site the
    patients are split train/val/test by ``split_ratios``, stratified by label. Patients,
    never images, are the unit of every allocation, so no patient is in two sites or two
    splits. The manifest does not depend on the row order of ``frame``, except for the
    order of one patient's images when there is no ``image_id`` column.

    Raises:
        ValueError: for invalid settings, missing columns, a site below ``min_site_size``
            (naming the site, its size and the setting to change) or a site without a
            training patient.
    """
    return partition_records(frame, SiteSettings(setup=setup, **options))


def partition_records(frame: pd.DataFrame, settings: SiteSettings, *, source: str = "records") -> Partition:
    """Run :func:`partition` with ready-made ``settings``; ``source`` names the data in messages."""
    records = _usable_records(validate_records(frame, source), settings, source)
    units = _patient_units(records, settings, source)
    held_out = holdout_mask(units["label"].to_numpy(), fraction=settings.holdout_fraction, seed=settings.seed)
    assignment = assign_sites(units[~held_out].reset_index(drop=True), settings)
    sites = np.full(len(units), HOLDOUT_SITE, dtype=np.int64)
    sites[~held_out] = assignment.sites
    _check_sizes(units, sites, assignment, settings)
    splits = _split_sites(units, sites, assignment.num_sites, settings)
    styles = (
        scanner_styles(assignment.num_sites, seed=settings.seed, strength=settings.style_strength)
        if settings.setup == "scanner-shift" else {}
    )
    manifest = _manifest(records, units, sites, splits, assignment, styles)
    summary = summarize(manifest, expected_batch_size=settings.expected_batch_size, dominant=assignment.dominant)
    warnings = guard_rail_warnings(summary, settings)
    log.info(
        "partitioned %s of %s into %s (%s, seed %d), %d held out",
        counted(len(manifest), "image"), counted(len(units), "patient"), counted(assignment.num_sites, "site"),
        settings.setup, settings.seed,
        int(held_out.sum()),
    )
    return Partition(
        manifest, summary, settings, tuple(warnings), styles,
        site_names=assignment.names, dominant=assignment.dominant,
    )


def _usable_records(records: pd.DataFrame, settings: SiteSettings, source: str) -> pd.DataFrame:
    """Add ``age_band`` and drop (and report) rows the setup cannot place."""
    if AGE_COLUMN in records.columns:
        records[AGE_BAND_COLUMN] = age_bands(records[AGE_COLUMN])
    column = _setup_column(settings)
    if column is None:
        return records
    if column not in records.columns:
        raise ValueError(
            f"{source}: setup {settings.setup!r} needs the column {column!r}, which is missing; "
            f"found {', '.join(map(str, records.columns))}"
        )
    records[column] = clean_text(records[column])
    empty = records[column] == ""
    if empty.all():
        raise ValueError(f"{source}: column {column!r} has no value in any row")
    report_rows(empty, source, f"no {column} value, which setup {settings.setup!r} needs")
    return records[~empty].reset_index(drop=True)


def _setup_column(settings: SiteSettings) -> str | None:
    if settings.setup == "attribute":
        return ATTRIBUTES[settings.attribute]
    if settings.setup == "column":
        return settings.site_column
    return None


def _patient_units(records: pd.DataFrame, settings: SiteSettings, source: str) -> pd.DataFrame:
    """Return one row per patient (sorted by id): its label, images and setup columns.

    A patient is positive when any of its images is. A patient whose images disagree on
    the attribute takes the value of its first image.
    """
    by_patient = records.groupby("patient_id", sort=True)
    units = pd.DataFrame({"label": by_patient["target"].max(), "images": by_patient.size()})
    if "class_name" in records.columns:
        units["class_name"] = by_patient["class_name"].first()
    column = _setup_column(settings)
    if settings.setup == "attribute":
        units["value"] = by_patient[column].first()
    elif settings.setup == "column":
        units["site_value"] = by_patient[column].first()
        _check_one_site_per_patient(records, column, source)
    return units.reset_index()


def _check_one_site_per_patient(records: pd.DataFrame, column: str, source: str) -> None:
    sites_per_patient = records.groupby("patient_id")[column].nunique()
    if (sites_per_patient > 1).any():
        patient = sites_per_patient.index[sites_per_patient > 1][0]
        names = sorted(records.loc[records["patient_id"] == patient, column].unique())
        raise ValueError(
            f"{source}: patient {patient!r} appears in sites {', '.join(map(repr, names))} of "
            f"column {column!r} ({int((sites_per_patient > 1).sum())} such patients); a patient "
            "must belong to one site"
        )


def _check_sizes(units: pd.DataFrame, sites: np.ndarray, assignment: SiteAssignment, settings: SiteSettings) -> None:
    in_site = sites >= 0
    images = np.bincount(sites[in_site], weights=units["images"].to_numpy()[in_site], minlength=assignment.num_sites)
    check_min_site_size({s: int(n) for s, n in enumerate(images)}, settings, assignment.names)


def _split_sites(units: pd.DataFrame, sites: np.ndarray, num_sites: int, settings: SiteSettings) -> np.ndarray:
    splits = np.full(len(units), HOLDOUT_SPLIT, dtype=object)
    labels = units["label"].to_numpy()
    for site in range(num_sites):
        members = np.flatnonzero(sites == site)
        splits[members] = split_site(labels[members], ratios=settings.split_ratios, seed=settings.seed, site=site)
        if not np.any(splits[members] == "train"):
            raise ValueError(
                f"site {site} has no training patient ({members.size} patients, split ratios "
                f"{settings.split_ratios}); raise the train ratio of --split or --min-site-size"
            )
    return splits


def _manifest(
    records: pd.DataFrame,
    units: pd.DataFrame,
    sites: np.ndarray,
    splits: np.ndarray,
    assignment: SiteAssignment,
    styles: dict,
) -> pd.DataFrame:
    """Give every record its patient's site and split, then order and type the rows."""
    position = pd.Series(np.arange(len(units)), index=units["patient_id"])
    unit_of_row = position.loc[records["patient_id"]].to_numpy()
    manifest = records.copy()
    manifest["site"] = sites[unit_of_row]
    manifest["split"] = splits[unit_of_row]
    if assignment.names is not None:
        manifest["site_name"] = [assignment.names[s] if s >= 0 else "" for s in manifest["site"]]
    for name, column in STYLE_COLUMNS.items() if styles else ():
        values = {site: getattr(style, name) for site, style in styles.items()}
        manifest[column] = manifest["site"].map(values).astype(float)
    site_rank = np.where(manifest["site"] >= 0, manifest["site"], assignment.num_sites)
    manifest = manifest.assign(
        _site_rank=site_rank, _split_rank=manifest["split"].map(_SPLIT_ORDER)
    )
    order = ["_site_rank", "_split_rank", "patient_id"] + (["image_id"] if "image_id" in manifest.columns else [])
    manifest = manifest.sort_values(order, kind="stable")
    manifest = manifest.drop(columns=["_site_rank", "_split_rank"])
    keep = [c for c in COLUMN_ORDER if c in manifest.columns]
    return normalize_manifest(manifest[keep], "partition manifest")
