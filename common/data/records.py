"""One record per image (patient), and the loaded dataset that contains them.

Box coordinates are pixels of the source image, origin top-left, as in the RSNA labels file:
``x`` and ``y`` are the top-left corner, ``width`` and ``height`` the extent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from common.data.report import LoadReport

LUNG_OPACITY = "Lung Opacity"
"""The RSNA class of every positive patient (Target 1)."""

UNKNOWN_CLASS = "Unknown"
"""Class of a negative patient whose class is not known (missing from, or contradicting,
the class file): it may be "Normal" or "No Lung Opacity / Not Normal"."""

FRAME_COLUMNS = (
    "patient_id",
    "image_path",
    "target",
    "class_name",
    "n_boxes",
    "ViewPosition",
    "PatientSex",
    "PatientAge",
    "PixelSpacing",
    "Modality",
    "rows",
    "columns",
    "bits_stored",
    "boxes",
    "mask_path",
)
"""Columns of :meth:`LoadedDataset.frame`, in order; folder metadata columns follow them."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in source-image pixels: top-left corner, width and height."""

    x: float
    y: float
    width: float
    height: float

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.width * self.height

    def clipped(self, *, rows: float, columns: float) -> "Box | None":
        """Return the part of the box inside a ``columns`` x ``rows`` image, or None if empty."""
        x0, y0 = max(self.x, 0.0), max(self.y, 0.0)
        x1, y1 = min(self.x + self.width, float(columns)), min(self.y + self.height, float(rows))
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1 - x0, y1 - y0)

    def as_list(self) -> list[float]:
        """Return ``[x, y, width, height]``."""
        return [self.x, self.y, self.width, self.height]


@dataclass(frozen=True)
class Metadata:
    """Header fields used to build sites; None where the source has no value.

    Attributes:
        view_position: ``PA`` or ``AP`` (DICOM ViewPosition).
        patient_sex: ``M``, ``F`` or ``O``.
        patient_age: age in whole years.
        pixel_spacing: row spacing in millimetres (first value of PixelSpacing).
        modality: DICOM Modality, e.g. ``CR`` or ``DX``.
        rows, columns: source image height and width in pixels.
        bits_stored: bits per sample of the source pixels (8 for the RSNA JPEGs).
    """

    view_position: str | None = None
    patient_sex: str | None = None
    patient_age: int | None = None
    pixel_spacing: float | None = None
    modality: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None

    def merged(self, fallback: "Metadata") -> "Metadata":
        """Return this metadata with each missing field taken from ``fallback``."""
        values = {
            name: getattr(self, name) if getattr(self, name) is not None else getattr(fallback, name)
            for name in self.__dataclass_fields__
        }
        return Metadata(**values)


@dataclass(frozen=True)
class Record:
    """One image of a dataset with its label.

    Attributes:
        patient_id: the RSNA patientId, or the file stem in the folder layout.
        image_path: the image file.
        target: 1 when the image shows lung opacity (at least one box or mask pixel), else 0.
        class_name: RSNA class ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal"),
            :data:`UNKNOWN_CLASS`, or for the folder layout the metadata ``class`` column.
        boxes: boxes in source-image pixels (RSNA layout; empty for the folder layout).
        mask_path: the mask PNG (folder layout; None for the RSNA layout).
        metadata: header fields.
        extra: further metadata columns of the folder layout, as (name, value) pairs.
    """

    patient_id: str
    image_path: Path
    target: int
    class_name: str
    boxes: tuple[Box, ...] = ()
    mask_path: Path | None = None
    metadata: Metadata = field(default_factory=Metadata)
    extra: tuple[tuple[str, Any], ...] = ()

    def frame_row(self) -> dict[str, Any]:
        """Return this record as one row of :meth:`LoadedDataset.frame`."""
        meta = self.metadata
        row: dict[str, Any] = {
            "patient_id": self.patient_id,
            "image_path": str(self.image_path),
            "target": int(self.target),
            "class_name": self.class_name,
            "n_boxes": len(self.boxes) if self.mask_path is None else None,
            "ViewPosition": meta.view_position,
            "PatientSex": meta.patient_sex,
            "PatientAge": meta.patient_age,
            "PixelSpacing": meta.pixel_spacing if meta.pixel_spacing is not None else math.nan,
            "Modality": meta.modality,
            "rows": meta.rows,
            "columns": meta.columns,
            "bits_stored": meta.bits_stored,
            "boxes": json.dumps([box.as_list() for box in self.boxes]),
            "mask_path": str(self.mask_path) if self.mask_path is not None else None,
        }
        row.update(dict(self.extra))
        return row


@dataclass
class LoadedDataset:
    """The records of one dataset folder, sorted by patient id, and what the load reported.

    Attributes:
        root: the dataset folder.
        layout: ``"rsna"`` or ``"folder"``.
        records: one record per usable image, sorted by ``patient_id``.
        report: every skipped or repaired item and the counts behind them.
        label_files: the CSV files the labels came from (they key the cache).
    """

    root: Path
    layout: str
    records: list[Record]
    report: LoadReport
    label_files: tuple[Path, ...] = ()

    def frame(self) -> pd.DataFrame:
        """Return one row per record with :data:`FRAME_COLUMNS` (then any extra columns).

        ``target`` is int; ``PatientAge``, ``rows``, ``columns``, ``bits_stored`` and
        ``n_boxes`` are nullable ``Int64`` (``n_boxes`` is missing for the folder layout,
        whose labels are masks); ``PixelSpacing`` is float millimetres, NaN when unknown.
        """
        return records_frame(self.records)


def records_frame(records: list[Record]) -> pd.DataFrame:
    """Return the frame of :meth:`LoadedDataset.frame` for ``records``, in their order."""
    frame = pd.DataFrame([record.frame_row() for record in records])
    return coerce_frame_dtypes(frame)


def coerce_frame_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with :data:`FRAME_COLUMNS` first and their documented dtypes."""
    if frame.empty:
        frame = pd.DataFrame(columns=list(FRAME_COLUMNS))
    ordered = list(FRAME_COLUMNS) + [c for c in frame.columns if c not in FRAME_COLUMNS]
    frame = frame.reindex(columns=ordered)
    frame["target"] = frame["target"].astype("int64")
    for column in ("PatientAge", "rows", "columns", "bits_stored", "n_boxes"):
        frame[column] = frame[column].astype("Int64")
    frame["PixelSpacing"] = frame["PixelSpacing"].astype("float64")
    return frame
