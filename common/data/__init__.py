"""Chest X-ray data: DICOM decoding, RSNA and image/mask readers, masks, cache, synthetic data.

Public entry points:

- :func:`load_dataset` reads a dataset folder (RSNA or images/masks layout) into records.
- :func:`read_rsna_labels` parses an RSNA labels CSV alone (no images needed).
- :func:`open_cache` decodes and resizes a dataset once into memory-mapped arrays.
- :class:`SegmentationDataset` serves cached images and masks to torch.
- :func:`synthesize` writes a synthetic dataset in the RSNA layout.

``SegmentationDataset`` imports torch, so it is loaded on first access only.
"""

from __future__ import annotations

from typing import Any

from common.data.cache import ImageCache, open_cache
from common.data.dicom import ImageReadError, decode_dicom
from common.data.load import detect_layout, load_dataset
from common.data.records import Box, LoadedDataset, Metadata, Record
from common.data.report import Issue, LoadReport
from common.data.rsna import read_rsna_labels
from common.data.synth import SynthSummary, synthesize

__all__ = [
    "Box",
    "ImageCache",
    "ImageReadError",
    "Issue",
    "LoadReport",
    "LoadedDataset",
    "Metadata",
    "Record",
    "SegmentationDataset",
    "SynthSummary",
    "decode_dicom",
    "detect_layout",
    "load_dataset",
    "open_cache",
    "read_rsna_labels",
    "synthesize",
]


def __getattr__(name: str) -> Any:
    if name == "SegmentationDataset":
        from common.data.dataset import SegmentationDataset

        return SegmentationDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
