"""``load_dataset``: detect a folder's layout, read its labels and images, check failures."""

from __future__ import annotations

import logging
from pathlib import Path

from common.data import folder, rsna
from common.data.records import LoadedDataset
from common.data.report import validate_failure_fraction
from common.text import counted

log = logging.getLogger(__name__)

LAYOUTS = ("rsna", "folder")


def detect_layout(root: Path | str) -> str:
    """Return ``"rsna"`` or ``"folder"`` for the dataset at ``root``.

    Raises ``FileNotFoundError`` if ``root`` does not exist and ``ValueError`` naming both
    expected layouts if it contains neither.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} not found")
    if not root.is_dir():
        raise ValueError(f"dataset path {root} is a file; pass the folder that contains the data")
    if (root / rsna.LABELS_FILE).is_file():
        return "rsna"
    if (root / folder.IMAGES_DIR).is_dir():
        return "folder"
    raise ValueError(
        f"{root} contains no dataset. Expected either the RSNA layout "
        f"({rsna.LABELS_FILE}, optional {rsna.CLASS_FILE}, {rsna.IMAGES_DIR}/<patientId>.dcm) "
        f"or the folder layout ({folder.IMAGES_DIR}/<id>.png|jpg|dcm with "
        f"{folder.MASKS_DIR}/<id>.png, optional {folder.METADATA_FILE}). "
        "`dpfedseg data synth OUT` writes a synthetic dataset in the RSNA layout"
    )


def scan_dataset(
    root: Path | str,
    *,
    check_images: bool = True,
    decode: bool = False,
    require_images: bool = True,
) -> LoadedDataset:
    """Read a dataset folder like :func:`load_dataset` but never stop on failures.

    For inspection: the result may hold no records, and no failure fraction is enforced.
    Raises only when ``root`` contains no dataset or a labels file cannot be parsed.
    """
    root = Path(root)
    layout = detect_layout(root)
    check_images = check_images or decode
    if layout == "rsna":
        return rsna.load_rsna(
            root, check_images=check_images, decode=decode, require_images=require_images
        )
    return folder.load_folder(root, check_images=check_images, decode=decode)


def load_dataset(
    root: Path | str,
    *,
    max_failure_fraction: float = 0.1,
    check_images: bool = True,
    decode: bool = False,
    require_images: bool = True,
) -> LoadedDataset:
    """Read a dataset folder (RSNA or images/masks layout, detected) into sorted records.

    Args:
        root: the dataset folder; it is only read, never written.
        max_failure_fraction: the load raises ``ValueError`` when more than this share of
            the images present, or of the label rows, had to be dropped as broken (see
            :meth:`LoadReport.check_failure_fraction`). Missing or unlabeled images do not
            count, so a folder holding only part of the images loads.
        check_images: open every image to read its header (size, view, sex, age, pixel
            spacing) and catch unreadable, truncated and non-image files. Without it,
            metadata comes from a header table if the folder has one.
        decode: also decode every image's pixels, catching codec failures (slow: about
            16 ms per 1024 x 1024 RSNA JPEG on one core). Implies ``check_images``.
        require_images: drop label rows whose image file is missing (reported). With
            False they are kept as records pointing at the expected path, and their
            ``missing_image`` issues are recorded but not logged. This serves label-only
            folders such as a metadata release without pixels.

    Every skipped or repaired item is logged (the first few per kind) and recorded in
    ``LoadedDataset.report``.
    """
    validate_failure_fraction(max_failure_fraction)
    loaded = scan_dataset(
        root, check_images=check_images, decode=decode, require_images=require_images
    )
    root, layout = loaded.root, loaded.layout
    loaded.report.log_suppressed()
    loaded.report.check_failure_fraction(
        kept_images=len(loaded.records),
        max_failure_fraction=max_failure_fraction,
        source=str(root),
    )
    if not loaded.records:
        raise ValueError(
            f"{root}: no usable image ({layout} layout); issues by kind: "
            f"{ {k: v for k, v in loaded.report.counts().items() if v} }. Check that the "
            "image files sit where the layout expects them"
        )
    log.info(
        "loaded %s (%d positive) from %s (%s layout, %s)",
        counted(len(loaded.records), "image"),
        sum(r.target for r in loaded.records),
        root,
        layout,
        counted(len(loaded.report.issues), "issue"),
    )
    return loaded
