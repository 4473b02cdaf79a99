"""The site manifest: one row per image with its site and split, written and read back.

Files written by :func:`write_manifest` for ``MANIFEST.csv``:

- ``MANIFEST.csv``: the manifest (columns in :mod:`common.sites.columns`);
- ``MANIFEST.summary.csv``: the per-site summary (:func:`common.sites.summary.summarize`);
- ``MANIFEST.json``: the settings, seed and counts that produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.atomic import write_csv, write_json
from common.sites.columns import AGE_COLUMN, COLUMN_ORDER, REQUIRED_COLUMNS, STYLE_COLUMNS, TEXT_COLUMNS
from common.sites.frames import clean_text
from common.sites.settings import HOLDOUT_SITE, HOLDOUT_SPLIT, SPLITS, SiteSettings
from common.sites.summary import summarize
from common.style import AcquisitionStyle

MANIFEST_FORMAT_VERSION = 1
_ALL_SPLITS = (*SPLITS, HOLDOUT_SPLIT)


@dataclass(frozen=True)
class Partition:
    """A partition of a records frame into sites.

    Attributes:
        manifest: one row per image (see :func:`normalize_manifest`).
        summary: one row per site, held-out set last (see ``summarize``).
        settings: the settings that produced it.
        warnings: the guard-rail warnings that were logged.
        styles: ``scanner-shift`` only: the acquisition style of each site.
        site_names: ``column`` only: the original name of each site id.
        dominant: ``attribute`` only: the dominant value of each site id.
    """

    manifest: pd.DataFrame
    summary: pd.DataFrame
    settings: SiteSettings
    warnings: tuple[str, ...] = ()
    styles: dict[int, AcquisitionStyle] = field(default_factory=dict)
    site_names: tuple[str, ...] | None = None
    dominant: tuple[str, ...] | None = None

    @property
    def num_sites(self) -> int:
        """Number of sites (the held-out set is not a site)."""
        return int((self.summary["site"] != HOLDOUT_SITE).sum())


@dataclass(frozen=True)
class ManifestFiles:
    """Paths written by :func:`write_manifest`."""

    manifest: Path
    summary: Path
    sidecar: Path


def summary_path(path: str | PathLike) -> Path:
    """Return ``<stem>.summary.csv`` beside the manifest ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.summary.csv")


def sidecar_path(path: str | PathLike) -> Path:
    """Return ``<stem>.json`` beside the manifest ``path``."""
    return Path(path).with_suffix(".json")


def write_manifest(
    partition_or_manifest: Partition | pd.DataFrame, path: str | PathLike, *, source: str | None = None
) -> ManifestFiles:
    """Write the manifest CSV, its summary CSV and its JSON sidecar atomically.

    A bare manifest frame is validated first and gets a summary without ``sample_rate``
    and a sidecar whose ``settings`` is ``null``. ``source`` (the data it came from) is
    recorded in the sidecar.

    Raises:
        ValueError: when ``path`` does not end in ``.csv`` or the manifest is invalid.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"the manifest path must end in .csv; got {path}")
    if isinstance(partition_or_manifest, Partition):
        partition = partition_or_manifest
        manifest, summary = partition.manifest, partition.summary
        settings: dict[str, Any] | None = partition.settings.to_dict()
        extra = {
            "warnings": list(partition.warnings),
            "dominant": partition.dominant,
            "site_names": partition.site_names,
        }
    else:
        manifest = normalize_manifest(partition_or_manifest, "manifest frame")
        summary, settings, extra = summarize(manifest), None, {}
    sidecar = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "settings": settings,
        "source": source,
        "num_sites": int((summary["site"] != HOLDOUT_SITE).sum()),
        "images": len(manifest),
        "patients": int(manifest["patient_id"].nunique()),
        **extra,
    }
    files = ManifestFiles(path, summary_path(path), sidecar_path(path))
    write_csv(files.manifest, manifest)
    write_csv(files.summary, summary)
    write_json(files.sidecar, sidecar)
    return files


def read_manifest(path: str | PathLike) -> pd.DataFrame:
    """Read a manifest CSV and validate it (see :func:`normalize_manifest`).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file, the column and the first bad data row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} not found; create one with `dpfedseg sites DATA --out {path}`"
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"manifest {path} is empty; expected the columns {', '.join(REQUIRED_COLUMNS)}") from None
    return normalize_manifest(raw, f"manifest {path}")


def read_manifest_sidecar(path: str | PathLike) -> dict[str, Any] | None:
    """Return the JSON sidecar of the manifest ``path``, or ``None`` when there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest sidecar {sidecar} is not valid JSON: {error}") from None


def normalize_manifest(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Return ``frame`` with the manifest's column types, after checking every rule.

    Types: ``patient_id``, ``split`` and the text columns become ``str`` with ``""`` for a
    missing value. ``site`` and ``target`` become ``int64``, ``PatientAge`` ``Int64`` and
    the style columns ``float64`` (``NaN`` on held-out rows).

    Rules: ``split`` is one of train/val/test/holdout. ``site`` is ``-1`` exactly on
    holdout rows and ``>= 0`` elsewhere, and the sites are numbered ``0..K-1`` without
    gaps. ``target`` is 0 or 1. No patient is in two
    (site, split) pairs. Style columns come all four or none, and each site has one valid
    style. Known columns come first in :data:`~common.sites.columns.COLUMN_ORDER`, any
    others follow as text.

    Raises:
        ValueError: naming ``source``, the column and the first bad data row.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(missing)}; a manifest needs "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )
    manifest = frame.reset_index(drop=True).copy()
    manifest["patient_id"] = clean_text(manifest["patient_id"])
    manifest["split"] = clean_text(manifest["split"])
    manifest["site"] = _integers(manifest["site"], source, "site")
    manifest["target"] = _integers(manifest["target"], source, "target")
    for column in TEXT_COLUMNS:
        if column in manifest.columns:
            manifest[column] = clean_text(manifest[column])
    if AGE_COLUMN in manifest.columns:
        manifest[AGE_COLUMN] = _integers(manifest[AGE_COLUMN], source, AGE_COLUMN, allow_missing=True)
    _normalize_styles(manifest, source)
    _check_rules(manifest, source)
    if STYLE_COLUMNS["contrast"] in manifest.columns:
        for site in sorted(manifest.loc[manifest["site"] >= 0, "site"].unique()):
            _style_of_rows(manifest[manifest["site"] == site], f"{source}: site {site}")
    known = [c for c in COLUMN_ORDER if c in manifest.columns]
    return manifest[known + [c for c in manifest.columns if c not in known]]


def _check_rules(manifest: pd.DataFrame, source: str) -> None:
    _first_bad(manifest, ~manifest["split"].isin(_ALL_SPLITS), source, "split", f"is not one of {', '.join(_ALL_SPLITS)}")
    _first_bad(manifest, ~manifest["target"].isin([0, 1]), source, "target", "is not 0 or 1")
    _first_bad(manifest, manifest["patient_id"] == "", source, "patient_id", "is empty")
    holdout = manifest["split"] == HOLDOUT_SPLIT
    wrong_site = (holdout & (manifest["site"] != HOLDOUT_SITE)) | (~holdout & (manifest["site"] < 0))
    _first_bad(
        manifest, wrong_site, source, "site",
        f"is invalid: held-out rows have site {HOLDOUT_SITE}, all other rows a site >= 0",
    )
    sites = sorted(int(s) for s in manifest.loc[manifest["site"] >= 0, "site"].unique())
    if sites != list(range(len(sites))):
        raise ValueError(
            f"{source}: column 'site' must number the sites 0..K-1 without gaps; found {sites}"
        )
    groups = manifest.groupby("patient_id")[["site", "split"]].nunique().max(axis=1)
    if (groups > 1).any():
        patient = groups.index[groups > 1][0]
        places = manifest.loc[manifest["patient_id"] == patient, ["site", "split"]].drop_duplicates()
        where = " and ".join(f"site {r.site}/{r.split}" for r in places.itertuples())
        raise ValueError(
            f"{source}: patient {patient!r} appears in {where}; a patient must be in one "
            f"site and one split ({int((groups > 1).sum())} such patients)"
        )


def _normalize_styles(manifest: pd.DataFrame, source: str) -> None:
    present = [c for c in STYLE_COLUMNS.values() if c in manifest.columns]
    if not present:
        return
    if len(present) != len(STYLE_COLUMNS):
        absent = [c for c in STYLE_COLUMNS.values() if c not in present]
        raise ValueError(f"{source}: style columns come together; missing {', '.join(absent)}")
    for column in present:
        values = manifest[column]
        if values.dtype == object or pd.api.types.is_string_dtype(values):
            values = clean_text(values)
            numbers = pd.to_numeric(values.where(values != ""), errors="coerce")
            _first_bad(manifest, numbers.isna() & (values != ""), source, column, "is not a number")
            values = numbers
        manifest[column] = values.astype(np.float64)


def site_ids(manifest: pd.DataFrame, site: int, split: str) -> list[str]:
    """Return the patient ids of ``site`` in ``split``, each once, in manifest order.

    Use site -1 with split ``holdout`` for the global held-out set.

    Raises:
        ValueError: for an unknown split or a site that is not in the manifest.
    """
    if split not in _ALL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(_ALL_SPLITS)}; got {split!r}")
    _check_site(manifest, site)
    rows = manifest[(manifest["site"] == site) & (manifest["split"] == split)]
    return list(dict.fromkeys(rows["patient_id"]))


def site_style(manifest: pd.DataFrame, site: int) -> AcquisitionStyle | None:
    """Return the acquisition style of ``site``, or ``None`` when the manifest has none.

    Only ``scanner-shift`` manifests carry styles; held-out rows have none. Magnification
    is 1 (see :data:`~common.sites.columns.STYLE_COLUMNS`).
    """
    _check_site(manifest, site)
    if STYLE_COLUMNS["contrast"] not in manifest.columns:
        return None
    return _style_of_rows(manifest[manifest["site"] == site], f"site {site}")


def site_sizes(manifest: pd.DataFrame, split: str | None = "train") -> dict[int, int]:
    """Return ``{site: images in split}`` for every site (``split=None``: all its splits).

    Sites with no image in ``split`` map to 0; the held-out set is not a site.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None; got {split!r}")
    in_sites = manifest[manifest["site"] >= 0]
    sites = sorted(int(s) for s in in_sites["site"].unique())
    chosen = in_sites if split is None else in_sites[in_sites["split"] == split]
    counts = chosen.groupby("site").size()
    return {site: int(counts.get(site, 0)) for site in sites}


def _style_of_rows(rows: pd.DataFrame, where: str) -> AcquisitionStyle | None:
    values = rows[list(STYLE_COLUMNS.values())].drop_duplicates()
    if values.isna().all(axis=None):
        return None
    if len(values) != 1 or values.isna().any(axis=None):
        raise ValueError(f"{where} has {len(values)} different or incomplete styles; a site has exactly one")
    row = values.iloc[0]
    try:
        return AcquisitionStyle(**{name: float(row[column]) for name, column in STYLE_COLUMNS.items()})
    except ValueError as error:
        raise ValueError(f"{where}: invalid style: {error}") from None


def _check_site(manifest: pd.DataFrame, site: int) -> None:
    sites = sorted(int(s) for s in manifest["site"].unique())
    if site not in sites:
        raise ValueError(f"site {site} is not in the manifest; its sites are {sites}")


def _integers(values: pd.Series, source: str, column: str, *, allow_missing: bool = False) -> pd.Series:
    if pd.api.types.is_integer_dtype(values) and (allow_missing or not values.isna().any()):
        return values.astype("Int64" if allow_missing else np.int64)
    text = clean_text(values)
    numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
    whole = numbers.notna() & (numbers == np.floor(numbers))
    bad = ~whole & ((text != "") | (not allow_missing))
    frame = pd.DataFrame({column: text})
    _first_bad(frame, bad, source, column, "is not an integer")
    return numbers.astype("Int64") if allow_missing else numbers.astype(np.int64)


def _first_bad(frame: pd.DataFrame, bad: pd.Series, source: str, column: str, problem: str) -> None:
    if not bad.any():
        return
    row = int(np.flatnonzero(bad.to_numpy())[0])
    value = frame[column].iloc[row]
    value = value.item() if isinstance(value, np.generic) else value
    raise ValueError(
        f"{source}: column {column!r}, data row {row + 1}: value {value!r} "
        f"{problem} ({int(bad.sum())} bad rows)"
    )
