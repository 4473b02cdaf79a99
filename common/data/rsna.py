"""The RSNA Pneumonia Detection Challenge layout: labels CSV, class CSV and DICOM folder.

    <root>/stage_2_train_labels.csv            patientId,x,y,width,height,Target
    <root>/stage_2_detailed_class_info.csv     patientId,class            (optional)
    <root>/stage_2_train_images/<patientId>.dcm
    <root>/stage_2_train_dicom_headers.csv.gz  header table (optional, used where a
                                               DICOM is absent or was not opened)

The labels file has one row per box; a negative patient has one row with empty
coordinates and Target 0. Box coordinates are pixels of the DICOM image, origin top-left.
The class file has one row per label row with the class "Lung Opacity", "Normal" or
"No Lung Opacity / Not Normal"; where it disagrees with the labels, the labels win.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.data.dicom import parse_age, parse_spacing
from common.data.images import check_image
from common.data.records import LUNG_OPACITY, UNKNOWN_CLASS, Box, LoadedDataset, Metadata, Record
from common.data.report import MAX_PLAUSIBLE_AGE, LoadReport

log = logging.getLogger(__name__)

LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
HEADER_TABLE_FILES = ("stage_2_train_dicom_headers.csv.gz", "stage_2_train_dicom_headers.csv")
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")


@dataclass
class PatientLabel:
    """The labels of one patient: target, boxes and (after the class file) the class.

    Attributes:
        patient_id: the RSNA patientId.
        target: 1 when any row of the patient has Target 1.
        boxes: boxes of the accepted rows, in source pixels, clipped at the top-left edge.
        line: the labels-file line of the patient's first row (the header is line 1).
        class_name: class after reconciliation with the labels (None before it).
    """

    patient_id: str
    target: int
    boxes: list[Box] = field(default_factory=list)
    line: int = 0
    class_name: str | None = None
    _targets_seen: set[int] = field(default_factory=set, repr=False)
    _positive_rows_rejected: int = field(default=0, repr=False)


def read_rsna_labels(csv_path: Path | str) -> tuple[dict[str, PatientLabel], LoadReport]:
    """Parse an RSNA labels CSV into one :class:`PatientLabel` per patient.

    Bad rows are skipped or repaired, and each is recorded in the returned report.
    Skipped: malformed rows, a Target other than 0/1, missing or non-numeric coordinates on
    a positive row, a box of non-positive size, and exact duplicate rows. Repaired: a box
    reaching left of or above the image is clipped at 0 (the right and bottom edges are
    clipped once the image size is known), coordinates on a negative row are ignored, and
    a patient with both Target values is kept as positive. A positive patient left without
    any box is removed.
    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` if its header
    lacks a required column or it has no data rows.
    """
    path = Path(csv_path)
    report = LoadReport()
    patients: dict[str, PatientLabel] = {}
    seen_rows: set[tuple] = set()
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header = _read_header(reader, path, LABEL_COLUMNS)
        index = {name: header.index(name) for name in LABEL_COLUMNS}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            report.label_rows += 1
            _read_label_row(row, f"{path}, line {reader.line_num}", reader.line_num, index,
                            len(header), patients, seen_rows, report)
    if report.label_rows == 0:
        raise ValueError(f"{path}: no data rows; expected one row per box or negative patient")
    _finish_patients(patients, path, report)
    return patients, report


def read_rsna_classes(
    csv_path: Path | str, patients: dict[str, PatientLabel], report: LoadReport
) -> None:
    """Set ``class_name`` of every patient from an RSNA class CSV, the labels winning.

    A patient absent from the class file, or whose class contradicts its Target ("Lung
    Opacity" exactly when Target is 1), gets "Lung Opacity" when positive and
    :data:`UNKNOWN_CLASS` when negative, with a warning. Class rows of patients not in the
    labels are reported and ignored. Several classes for one patient are reported; the
    first one consistent with the labels is kept.
    """
    path = Path(csv_path)
    classes: dict[str, list[str]] = {}
    lines: dict[str, int] = {}
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header = _read_header(reader, path, CLASS_COLUMNS)
        id_at, class_at = header.index("patientId"), header.index("class")
        for row in reader:
            if len(row) != len(header) or not row[id_at].strip():
                continue
            patient_id, name = row[id_at].strip(), row[class_at].strip()
            found = classes.setdefault(patient_id, [])
            lines.setdefault(patient_id, reader.line_num)
            if name not in found:
                found.append(name)
    for patient_id in sorted(set(classes) - set(patients)):
        report.add(
            "unknown_patient",
            f"{path}, line {lines[patient_id]}",
            f"class row for patient {patient_id} who has no row in the labels file; ignored",
        )
    for patient in patients.values():
        _reconcile_class(patient, classes.get(patient.patient_id), path, report)


def load_rsna(
    root: Path,
    *,
    check_images: bool,
    decode: bool,
    require_images: bool,
) -> LoadedDataset:
    """Load an RSNA-layout folder into records (see :func:`common.data.load_dataset`)."""
    labels_path = root / LABELS_FILE
    patients, report = read_rsna_labels(labels_path)
    label_files = [labels_path]
    class_path = root / CLASS_FILE
    if class_path.is_file():
        read_rsna_classes(class_path, patients, report)
        label_files.append(class_path)
    else:
        log.info("%s not found; classes derived from Target", class_path)
        for patient in patients.values():
            patient.class_name = LUNG_OPACITY if patient.target else UNKNOWN_CLASS

    header_table = _read_optional_header_table(root)
    images = _list_dicoms(root / IMAGES_DIR, require_images=require_images)
    for stem in sorted(set(images) - set(patients)):
        report.add("unlabeled_image", str(images[stem]), "image has no row in the labels file")

    records = []
    for patient_id in sorted(patients):
        record = _build_record(
            patients[patient_id],
            images.get(patient_id),
            root=root,
            header_table=header_table,
            check_images=check_images,
            decode=decode,
            require_images=require_images,
            report=report,
        )
        if record is not None:
            records.append(record)
    report.decoded = decode
    return LoadedDataset(root, "rsna", records, report, tuple(label_files))


def _read_label_row(
    row: list[str],
    where: str,
    line: int,
    index: dict[str, int],
    width: int,
    patients: dict[str, PatientLabel],
    seen_rows: set[tuple],
    report: LoadReport,
) -> None:
    if len(row) != width:
        report.add("malformed_row", where, f"{len(row)} fields, {width} expected; row skipped")
        return
    patient_id = row[index["patientId"]].strip()
    if not patient_id:
        report.add("malformed_row", where, "empty patientId; row skipped")
        return
    target = _parse_target(row[index["Target"]])
    if target is None:
        report.add(
            "invalid_target", where, f"Target {row[index['Target']]!r} is not 0 or 1; row skipped"
        )
        return

    raw = [row[index[name]].strip() for name in ("x", "y", "width", "height")]
    key = (patient_id, target, tuple(_number_or_text(value) for value in raw))
    if key in seen_rows:
        report.add("duplicate_row", where, f"repeats an earlier row of patient {patient_id}; dropped")
        return
    seen_rows.add(key)

    patient = patients.get(patient_id)
    if patient is None:
        patient = patients[patient_id] = PatientLabel(patient_id, target, line=line)
    patient._targets_seen.add(target)
    patient.target = max(patient.target, target)
    if target == 0:
        if any(raw):
            report.add(
                "coordinates_on_negative",
                where,
                f"Target 0 row of patient {patient_id} has coordinates {raw}; they are ignored",
            )
        return
    box = _parse_box(raw, where, patient_id, report)
    if box is None:
        patient._positive_rows_rejected += 1
        return
    patient.boxes.append(box)


def _parse_box(raw: list[str], where: str, patient_id: str, report: LoadReport) -> Box | None:
    values = [_finite_float(value) for value in raw]
    if any(value is None for value in values):
        report.add(
            "bad_coordinates",
            where,
            f"positive row of patient {patient_id} has missing or non-numeric x, y, width, "
            f"height {raw}; row skipped",
        )
        return None
    box = Box(*values)  # type: ignore[arg-type]
    if box.width <= 0 or box.height <= 0:
        report.add(
            "box_dropped",
            where,
            f"box of patient {patient_id} has non-positive size {box.width} x {box.height}; dropped",
        )
        return None
    if box.x >= 0 and box.y >= 0:
        return box
    clipped = box.clipped(rows=math.inf, columns=math.inf)  # type: ignore[arg-type]
    if clipped is None:
        report.add("box_dropped", where, f"box {raw} of patient {patient_id} lies outside the image")
        return None
    report.add(
        "box_clipped", where, f"box {raw} of patient {patient_id} starts outside the image; clipped"
    )
    return clipped


def _finish_patients(patients: dict[str, PatientLabel], path: Path, report: LoadReport) -> None:
    for patient_id in list(patients):
        patient = patients[patient_id]
        where = f"{path}, line {patient.line}"
        if len(patient._targets_seen) > 1:
            report.add(
                "conflicting_target",
                where,
                f"patient {patient_id} has rows with Target 0 and Target 1; kept as positive",
            )
        if patient.target == 1 and not patient.boxes:
            report.add(
                "positive_without_boxes",
                where,
                f"positive patient {patient_id} has no usable box "
                f"({patient._positive_rows_rejected} rows rejected); patient skipped",
            )
            del patients[patient_id]


def _reconcile_class(
    patient: PatientLabel, classes: list[str] | None, path: Path, report: LoadReport
) -> None:
    expected = LUNG_OPACITY if patient.target else UNKNOWN_CLASS
    if not classes:
        report.add(
            "missing_class",
            str(path),
            f"patient {patient.patient_id} (Target {patient.target}) has no class row; "
            f"class set to {expected!r}",
        )
        patient.class_name = expected
        return
    consistent = [name for name in classes if (name == LUNG_OPACITY) == bool(patient.target)]
    if len(classes) > 1:
        report.add(
            "class_conflict",
            str(path),
            f"patient {patient.patient_id} has several classes {classes}; "
            f"kept {consistent[0] if consistent else expected!r}",
        )
    if consistent:
        patient.class_name = consistent[0]
        return
    report.add(
        "class_mismatch",
        str(path),
        f"patient {patient.patient_id} has class {classes[0]!r} but Target {patient.target} "
        f"in the labels; the labels win, class set to {expected!r}",
    )
    patient.class_name = expected


def _build_record(
    patient: PatientLabel,
    image: Path | None,
    *,
    root: Path,
    header_table: dict[str, Metadata],
    check_images: bool,
    decode: bool,
    require_images: bool,
    report: LoadReport,
) -> Record | None:
    metadata = header_table.get(patient.patient_id, Metadata())
    if image is None:
        report.add(
            "missing_image",
            str(root / IMAGES_DIR / f"{patient.patient_id}.dcm"),
            f"patient {patient.patient_id} is in the labels file but its DICOM is missing",
            # Without required images the record is kept, and a label-only folder would
            # log one warning per patient.
            warn=require_images,
        )
        if require_images:
            return None
        image = root / IMAGES_DIR / f"{patient.patient_id}.dcm"
    elif check_images:
        header = check_image(image, decode=decode, report=report)
        if header is None:
            return None
        metadata = header.merged(metadata)
    _report_implausible_age(metadata, str(image), report)
    boxes = _clip_to_image(patient, metadata, str(image), report)
    if patient.target and not boxes:
        report.add(
            "positive_without_boxes",
            str(image),
            f"every box of positive patient {patient.patient_id} lies outside the "
            f"{metadata.columns} x {metadata.rows} image; patient skipped",
        )
        return None
    return Record(
        patient_id=patient.patient_id,
        image_path=image,
        target=patient.target,
        class_name=patient.class_name or UNKNOWN_CLASS,
        boxes=tuple(boxes),
        metadata=metadata,
    )


def _clip_to_image(
    patient: PatientLabel, metadata: Metadata, where: str, report: LoadReport
) -> list[Box]:
    if metadata.rows is None or metadata.columns is None:
        return list(patient.boxes)
    kept = []
    for box in patient.boxes:
        clipped = box.clipped(rows=metadata.rows, columns=metadata.columns)
        if clipped is None:
            report.add(
                "box_dropped",
                where,
                f"box {box.as_list()} of patient {patient.patient_id} lies outside the "
                f"{metadata.columns} x {metadata.rows} image; dropped",
            )
        elif clipped != box:
            report.add(
                "box_clipped",
                where,
                f"box {box.as_list()} of patient {patient.patient_id} reaches outside the "
                f"{metadata.columns} x {metadata.rows} image; clipped to {clipped.as_list()}",
            )
            kept.append(clipped)
        else:
            kept.append(box)
    return kept


def _report_implausible_age(metadata: Metadata, where: str, report: LoadReport) -> None:
    if metadata.patient_age is not None and metadata.patient_age > MAX_PLAUSIBLE_AGE:
        report.add(
            "implausible_age",
            where,
            f"PatientAge {metadata.patient_age} years is above {MAX_PLAUSIBLE_AGE}; kept as read",
        )


def _list_dicoms(folder: Path, *, require_images: bool) -> dict[str, Path]:
    if not folder.is_dir():
        if require_images:
            raise FileNotFoundError(
                f"image folder {folder} not found; the RSNA layout expects the DICOMs at "
                f"{folder}/<patientId>.dcm beside {LABELS_FILE}"
            )
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".dcm"}


def read_header_table(path: Path | str) -> dict[str, Metadata]:
    """Read a DICOM header table (one row per image, as in the RSNA metadata release).

    The patient id comes from ``PatientID`` or else the ``Filename`` stem; the columns
    ViewPosition, PatientSex, PatientAge, PixelSpacing and Modality are used when present.
    """
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "PatientID" in table.columns:
        ids = table["PatientID"]
    elif "Filename" in table.columns:
        ids = table["Filename"].str.replace(r"\.dcm$", "", regex=True)
    else:
        raise ValueError(f"{path}: header table needs a PatientID or Filename column")

    def column(name: str) -> pd.Series:
        return table[name] if name in table.columns else pd.Series([""] * len(table))

    result = {}
    for patient_id, view, sex, age, spacing, modality in zip(
        ids, column("ViewPosition"), column("PatientSex"), column("PatientAge"),
        column("PixelSpacing"), column("Modality"),
    ):
        result[patient_id.strip()] = Metadata(
            view_position=view.strip() or None,
            patient_sex=sex.strip() or None,
            patient_age=parse_age(age),
            pixel_spacing=parse_spacing(spacing),
            modality=modality.strip() or None,
        )
    return result


def _read_optional_header_table(root: Path) -> dict[str, Metadata]:
    for name in HEADER_TABLE_FILES:
        if (root / name).is_file():
            return read_header_table(root / name)
    return {}


def _open_csv(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found")
    # utf-8-sig drops a byte-order mark that spreadsheet programs put before the header.
    return path.open(newline="", encoding="utf-8-sig")


def _read_header(reader, path: Path, required: tuple[str, ...]) -> list[str]:
    header = [cell.strip() for cell in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(
            f"{path}: header {','.join(header) or '(empty file)'} lacks column(s) "
            f"{', '.join(missing)}; expected {','.join(required)}"
        )
    return header


def _parse_target(value: str) -> int | None:
    number = _finite_float(value)
    if number is None or number not in (0.0, 1.0):
        return None
    return int(number)


def _finite_float(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number_or_text(value: str) -> float | str:
    number = _finite_float(value)
    return number if number is not None else value
