"""Records frames: one row per image with the patient, its label and its attributes.

A records frame has the columns ``patient_id`` (str), ``target`` (0/1) and, when known,
``class_name``, ``ViewPosition``, ``PatientSex`` and ``PatientAge`` (whole years). Text
columns use ``""`` for a missing value and ``PatientAge`` is a nullable integer.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient_id", "target")
TEXT_COLUMNS = ("class_name", "ViewPosition", "PatientSex")
AGE_COLUMN = "PatientAge"
AGE_BAND_COLUMN = "age_band"

AGE_BANDS: tuple[tuple[str, int, int | None], ...] = (
    ("<18", 0, 18),
    ("18-39", 18, 40),
    ("40-59", 40, 60),
    ("60+", 60, None),
)
"""Age bands as ``(name, lowest age, first age above the band)`` in whole years; the
last band is open. Children, young adults, middle age and the elderly differ in how
pneumonia looks and how often it occurs."""

MAX_PLAUSIBLE_AGE = 120
"""Ages above this are kept but reported: the RSNA headers contain a few (148, 155 years)
that are recording errors, and they fall into the last band."""

UNKNOWN_CLASS_NAMES = ("", "Unknown")
"""``class_name`` values that mean the class is unknown: empty here and in records CSVs,
``"Unknown"`` from the dataset reader of ``common.data``."""

RSNA_LABELS_FILE = "stage_2_train_labels.csv"
RSNA_CLASS_FILE = "stage_2_detailed_class_info.csv"
RSNA_HEADERS_FILE = "stage_2_train_dicom_headers.csv.gz"
RSNA_POSITIVE_CLASS = "Lung Opacity"
_EXAMPLE_ROWS = 5


def age_bands(ages: pd.Series) -> pd.Series:
    """Return the :data:`AGE_BANDS` name of every age, ``""`` where the age is missing."""
    values = pd.to_numeric(ages, errors="coerce")
    bands = pd.Series("", index=ages.index, dtype="str")
    for name, low, high in AGE_BANDS:
        inside = values >= low if high is None else (values >= low) & (values < high)
        bands[inside.fillna(False).astype(bool)] = name
    return bands


def validate_records(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Return a cleaned copy of ``frame`` with the types of a records frame.

    Rows without a patient id or with a target other than 0/1 are skipped, counted and
    reported in one warning per kind. A frame without any usable row is an error. Ages
    that are not whole numbers >= 0 become missing and are reported. ``source`` names the
    data in messages.

    Raises:
        ValueError: when a required column is missing or no row is usable.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(missing)}; a records table needs "
            f"patient_id and target (0/1), optionally {', '.join(TEXT_COLUMNS)} and "
            f"{AGE_COLUMN}; found columns {', '.join(map(str, frame.columns))}"
        )
    records = frame.reset_index(drop=True).copy()
    records["patient_id"] = clean_text(records["patient_id"])
    target = pd.to_numeric(records["target"], errors="coerce")
    usable = (records["patient_id"] != "") & target.isin([0, 1])
    report_rows(~usable, source, "no patient_id or a target other than 0/1")
    records = records[usable].reset_index(drop=True)
    records["target"] = target[usable].to_numpy().astype(np.int64)
    if records.empty:
        raise ValueError(f"{source}: no usable row (each needs a patient_id and a 0/1 target)")
    for column in TEXT_COLUMNS:
        if column in records.columns:
            records[column] = clean_text(records[column])
    if AGE_COLUMN in records.columns:
        records[AGE_COLUMN] = _ages(records[AGE_COLUMN], source)
    return records


def read_records_csv(path: str | PathLike) -> pd.DataFrame:
    """Read a records CSV (columns as in :func:`validate_records`) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} not found")
    records = validate_records(pd.read_csv(path, dtype=str, keep_default_na=False), str(path))
    report_implausible_ages(records, str(path))
    return records


def rsna_metadata_frame(folder: str | PathLike) -> pd.DataFrame:
    """Build a records frame from the RSNA label, class and header files of ``folder``.

    One row per patient (RSNA has one image per patient). ``target`` is 1 when any label
    row of the patient has ``Target == 1``. ``class_name`` comes from the class file and
    is ``""`` for a patient missing there. ``ViewPosition``, ``PatientSex`` and
    ``PatientAge`` come from the DICOM header table (``stage_2_train_dicom_headers.csv.gz``,
    matched on ``PatientID``); without that file those columns are absent. Patients missing
    from the optional files, and labels that disagree with the class, are counted and
    reported as warnings.

    Raises:
        FileNotFoundError: when the labels file is missing.
        ValueError: when a file lacks the columns it needs.
    """
    folder = Path(folder)
    labels_path = folder / RSNA_LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(
            f"{labels_path} not found; an RSNA folder needs {RSNA_LABELS_FILE} "
            f"(and optionally {RSNA_CLASS_FILE} and {RSNA_HEADERS_FILE})"
        )
    labels = _read_table(labels_path, ("patientId", "Target"))
    frame = validate_records(
        labels.rename(columns={"patientId": "patient_id", "Target": "target"}), str(labels_path)
    )
    records = frame.groupby("patient_id", sort=True)["target"].max().reset_index()
    class_path = folder / RSNA_CLASS_FILE
    if class_path.is_file():
        records["class_name"] = _rsna_classes(class_path, records)
    headers_path = folder / RSNA_HEADERS_FILE
    if headers_path.is_file():
        records = _join_headers(records, headers_path)
    else:
        log.info("%s not found: ViewPosition, PatientSex and PatientAge are absent", headers_path)
    records = validate_records(records, str(folder))
    report_implausible_ages(records, str(folder))
    return records


def _rsna_classes(path: Path, records: pd.DataFrame) -> pd.Series:
    table = _read_table(path, ("patientId", "class"))
    per_patient = table.groupby("patientId", sort=False)["class"]
    conflicting = int((per_patient.nunique() > 1).sum())
    if conflicting:
        log.warning("%s: %d patients have more than one class; the first is used", path, conflicting)
    classes = records["patient_id"].map(per_patient.first()).fillna("").astype(str)
    absent = int((classes == "").sum())
    if absent:
        log.warning(
            "%s: %d of %d labelled patients have no class row (first: %s); their class_name "
            "is empty", path, absent, len(records),
            ", ".join(records["patient_id"][classes == ""].head(_EXAMPLE_ROWS)),
        )
    known = classes != ""
    disagree = known & ((classes == RSNA_POSITIVE_CLASS) != (records["target"] == 1))
    if disagree.any():
        log.warning(
            "%s: %d patients have a class that disagrees with their Target (first: %s)",
            path, int(disagree.sum()), ", ".join(records["patient_id"][disagree].head(_EXAMPLE_ROWS)),
        )
    return classes


def _join_headers(records: pd.DataFrame, path: Path) -> pd.DataFrame:
    columns = ("PatientID", "ViewPosition", "PatientSex", AGE_COLUMN)
    headers = _read_table(path, columns)[list(columns)]
    duplicated = headers["PatientID"].duplicated()
    if duplicated.any():
        log.warning("%s: %d repeated PatientID rows; the first is used", path, int(duplicated.sum()))
        headers = headers[~duplicated]
    joined = records.merge(
        headers.rename(columns={"PatientID": "patient_id"}), on="patient_id", how="left",
        indicator=True,
    )
    absent = joined["_merge"] == "left_only"
    if absent.any():
        log.warning(
            "%s: %d of %d labelled patients have no header row; their attributes are empty",
            path, int(absent.sum()), len(records),
        )
    return joined.drop(columns="_merge")


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}"
        )
    return table


def clean_text(values: pd.Series) -> pd.Series:
    """Return ``values`` as stripped ``str`` with ``""`` for a missing value."""
    return values.fillna("").astype(str).str.strip()


def _ages(values: pd.Series, source: str) -> pd.Series:
    text = clean_text(values)
    numbers = pd.to_numeric(text, errors="coerce")
    whole = numbers.notna() & (numbers >= 0) & (numbers == np.floor(numbers))
    report_rows(
        (text != "") & ~whole, source, f"a {AGE_COLUMN} that is no whole number >= 0",
        action="left the age empty in",
    )
    return numbers.where(whole).astype("Int64")


def report_implausible_ages(records: pd.DataFrame, source: str) -> None:
    """Log one warning counting the ages above :data:`MAX_PLAUSIBLE_AGE` (they are kept)."""
    if AGE_COLUMN not in records.columns:
        return
    ages = records[AGE_COLUMN]
    implausible = (ages > MAX_PLAUSIBLE_AGE).fillna(False).astype(bool)
    if implausible.any():
        log.warning(
            "%s: %d rows have %s above %d years (kept, band %s): %s", source,
            int(implausible.sum()), AGE_COLUMN, MAX_PLAUSIBLE_AGE, AGE_BANDS[-1][0],
            ", ".join(str(int(a)) for a in ages[implausible].head(_EXAMPLE_ROWS)),
        )


def report_rows(bad: pd.Series, source: str, problem: str, *, action: str = "skipped") -> None:
    """Log one warning counting the rows flagged in ``bad``, with the first few row numbers.

    Row numbers count data rows from 1, as a spreadsheet shows them below the header.
    """
    if not bad.any():
        return
    rows = ", ".join(str(i + 1) for i in np.flatnonzero(bad.to_numpy())[:_EXAMPLE_ROWS])
    log.warning("%s: %s %d rows with %s (data rows %s ...)", source, action, int(bad.sum()), problem, rows)
