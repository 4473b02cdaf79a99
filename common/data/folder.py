"""The image + mask folder layout.

    <root>/images/<id>.png | .jpg | .jpeg | .dcm   one image per id (colour becomes gray)
    <root>/masks/<id>.png                          0/1 or 0/255, same size as the image
    <root>/metadata.csv                            optional: an id column (id, patient_id,
                                                   patientId or image_id) and any of
                                                   ViewPosition, PatientSex, PatientAge,
                                                   PixelSpacing, Modality, class

An image is positive (target 1) when its mask has any set pixel. Other metadata columns
are carried into the records frame unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from common.data.dicom import ImageReadError, parse_age, parse_spacing
from common.data.images import IMAGE_SUFFIXES, check_image, read_mask
from common.data.records import LUNG_OPACITY, UNKNOWN_CLASS, LoadedDataset, Metadata, Record
from common.data.report import LoadReport

IMAGES_DIR = "images"
MASKS_DIR = "masks"
METADATA_FILE = "metadata.csv"
ID_COLUMNS = ("id", "patient_id", "patientId", "image_id")
KNOWN_COLUMNS = ("ViewPosition", "PatientSex", "PatientAge", "PixelSpacing", "Modality", "class")


def load_folder(root: Path, *, check_images: bool, decode: bool) -> LoadedDataset:
    """Load an images/masks folder into records (see :func:`common.data.load_dataset`)."""
    report = LoadReport()
    images = _list_images(root / IMAGES_DIR, report)
    masks = _list_masks(root / MASKS_DIR)
    metadata_path = root / METADATA_FILE
    table = _read_metadata(metadata_path, report) if metadata_path.is_file() else {}
    for patient_id in sorted(set(masks) - set(images)):
        report.add("missing_image", str(masks[patient_id]), f"mask of {patient_id} has no image")
    for patient_id in sorted(set(table) - set(images)):
        report.add(
            "unknown_patient", str(metadata_path), f"metadata row for {patient_id} has no image"
        )

    records = []
    for patient_id in sorted(images):
        if patient_id not in masks:
            report.add("unlabeled_image", str(images[patient_id]), "image has no mask")
            continue
        record = _build_record(
            patient_id,
            images[patient_id],
            masks[patient_id],
            table.get(patient_id, {}),
            check_images=check_images,
            decode=decode,
            report=report,
        )
        if record is not None:
            records.append(record)
    report.decoded = decode
    label_files = (metadata_path,) if metadata_path.is_file() else ()
    return LoadedDataset(root, "folder", records, report, label_files)


def _build_record(
    patient_id: str,
    image_path: Path,
    mask_path: Path,
    row: dict[str, Any],
    *,
    check_images: bool,
    decode: bool,
    report: LoadReport,
) -> Record | None:
    try:
        mask = read_mask(mask_path)
    except ImageReadError as error:
        report.add(error.kind, str(error.path), error.reason)
        return None
    if mask.thresholded:
        report.add(
            "mask_values",
            str(mask_path),
            f"mask values {list(mask.values[:6])} are not 0/1 or 0/255; thresholded at half range",
        )
    metadata = _metadata_from_row(row)
    if check_images:
        header = check_image(image_path, decode=decode, report=report)
        if header is None:
            return None
        metadata = metadata.merged(header)
        shape = (metadata.rows, metadata.columns)
        if shape != mask.mask.shape:
            report.add(
                "bad_mask",
                str(mask_path),
                f"mask is {mask.mask.shape[1]} x {mask.mask.shape[0]} but its image is "
                f"{shape[1]} x {shape[0]} (width x height); image skipped",
            )
            return None
    target = int(mask.mask.any())
    class_name = row.get("class") or (LUNG_OPACITY if target else UNKNOWN_CLASS)
    extra = tuple((k, v) for k, v in row.items() if k not in KNOWN_COLUMNS)
    return Record(
        patient_id=patient_id,
        image_path=image_path,
        target=target,
        class_name=str(class_name),
        mask_path=mask_path,
        metadata=metadata,
        extra=extra,
    )


def _list_images(folder: Path, report: LoadReport) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} not found; the folder layout expects "
            f"{folder}/<id>.png|jpg|dcm and masks at {folder.parent / MASKS_DIR}/<id>.png"
        )
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, []).append(path)
    images = {}
    for patient_id, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            report.add(
                "duplicate_image",
                str(folder),
                f"id {patient_id} has several images ({names}); all skipped, keep one",
            )
            continue
        images[patient_id] = paths[0]
    return images


def _list_masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"mask folder {folder} not found; the folder layout expects one "
            f"{folder}/<id>.png (0/1 or 0/255) per image"
        )
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png"}


def _read_metadata(path: Path, report: LoadReport) -> dict[str, dict[str, Any]]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    id_column = next((c for c in ID_COLUMNS if c in table.columns), None)
    if id_column is None:
        raise ValueError(
            f"{path}: no id column; expected one of {', '.join(ID_COLUMNS)} "
            f"(found {', '.join(table.columns)})"
        )
    rows: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(table.to_dict("records"), start=2):
        patient_id = str(row.pop(id_column)).strip()
        if patient_id in rows:
            report.add("duplicate_row", f"{path}, line {line}", f"second row for {patient_id}; dropped")
            continue
        rows[patient_id] = {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}
    return rows


def _metadata_from_row(row: dict[str, Any]) -> Metadata:
    def text(name: str) -> str | None:
        return row.get(name) or None

    return Metadata(
        view_position=text("ViewPosition"),
        patient_sex=text("PatientSex"),
        patient_age=parse_age(text("PatientAge")),
        pixel_spacing=parse_spacing(text("PixelSpacing")),
        modality=text("Modality"),
    )
