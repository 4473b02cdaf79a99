"""Chest X-ray data: DICOM decoding, RSNA and image/mask readers, masks, cache, synthetic data.

Public entry points:

- :func:`load_dataset` reads a dataset folder (RSNA or images/masks layout) into records.
- :func:`read_rsna_labels` parses an RSNA labels CSV alone (no images needed).
"""

from __future__ import annotations

from typing import Any

from common.data.dicom import ImageReadError, decode_dicom
from common.data.load import detect_layout, load_dataset
from common.data.records import Box, LoadedDataset, Metadata, Record
from common.data.report import Issue, LoadReport
from common.data.rsna import read_rsna_labels

__all__ = [
    "Box",
    "ImageReadError",
    "Issue",
    "LoadReport",
    "LoadedDataset",
    "Metadata",
    "Record",
    "decode_dicom",
    "detect_layout",
    "load_dataset",
    "read_rsna_labels",
]

