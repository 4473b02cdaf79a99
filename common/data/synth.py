"""``synthesize``: a synthetic dataset in the exact RSNA layout, deterministic per seed.

Output folder:

    stage_2_train_labels.csv             patientId,x,y,width,height,Target (one row per box)
    stage_2_detailed_class_info.csv      patientId,class (one row per label row)
    stage_2_train_images/<patientId>.dcm JPEG Baseline, 8-bit MONOCHROME2, Secondary
                                         Capture, Modality CR
    synth_summary.json                   settings, counts and site styles
    synth_sites.csv                      patientId,site (only with site styles)

Headers (ViewPosition, PatientSex, PatientAge, PixelSpacing) and labels (positive rate,
boxes per positive image, box sizes and positions) are drawn from the real RSNA
statistics in :mod:`common.data.synth_constants`. Image ``i`` depends only on
``(seed, i)`` and the settings, so a larger dataset of one seed starts with the smaller one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tqdm import tqdm

from common import atomic
from common.data import synth_constants as real
from common.data.records import LUNG_OPACITY, Box
from common.data.rsna import CLASS_FILE, IMAGES_DIR, LABELS_FILE
from common.data.synth_image import DEVICE_RATE_AP, FINDINGS, draw_anatomy, render_chest
from common.style import AcquisitionStyle, apply_style

log = logging.getLogger(__name__)

NORMAL = "Normal"
NOT_NORMAL = "No Lung Opacity / Not Normal"
SUMMARY_FILE = "synth_summary.json"
SITES_FILE = "synth_sites.csv"
GENERATOR_VERSION = 1
"""Bump when the same seed and settings would give other files."""

PROGRESS_MIN_IMAGES = 50
"""Runs of more images than this show a tqdm progress bar."""

MIN_IMAGE_SIZE = 32
JPEG_QUALITY = 95
MAX_BOX_TRIES = 20
"""Draws per box before a box overlapping an earlier box of the image is kept anyway."""

# Random streams per image; image i uses default_rng([seed, i, stream]).
_LABEL_STREAM, _PIXEL_STREAM, _STYLE_STREAM = 0, 1, 2
_SITE_STYLE_STREAM = 0x5173


@dataclass(frozen=True)
class SynthCase:
    """Header and labels of one synthetic image; boxes in pixels of the 1024 x 1024 frame.

    ``finding`` is the non-pneumonia abnormality drawn for a "Not Normal" image (one of
    :data:`common.data.synth_image.FINDINGS`) or ``""``; ``device`` marks a visible tube.
    """

    patient_id: str
    view_position: str
    patient_sex: str
    patient_age: int
    pixel_spacing: float
    target: int
    class_name: str
    boxes: tuple[Box, ...]
    finding: str = ""
    device: bool = False


@dataclass
class SynthSummary:
    """Counts, settings and timing of one :func:`synthesize` run.

    Attributes:
        out_dir: the dataset folder.
        images, positives, boxes: counts.
        image_size: side of every image in pixels.
        seed: the seed.
        seconds: wall time of the whole generation.
        site_styles: the style of each site (empty without sites).
    """

    out_dir: Path
    images: int
    positives: int
    boxes: int
    image_size: int
    seed: int
    seconds: float
    site_styles: list[AcquisitionStyle] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        """Mean wall time per image, in seconds."""
        return self.seconds / self.images

    def to_dict(self) -> dict:
        """Return the summary as a JSON-ready mapping."""
        values = asdict(self)
        values["out_dir"] = str(self.out_dir)
        values["site_styles"] = [style.to_dict() for style in self.site_styles]
        values["generator_version"] = GENERATOR_VERSION
        return values


def synthesize(
    out_dir: Path | str,
    *,
    images: int,
    seed: int,
    image_size: int = real.REFERENCE_SIZE,
    site_styles: Sequence[AcquisitionStyle] | None = None,
    positive_rate: float | None = None,
) -> SynthSummary:
    """Write ``images`` synthetic chest radiographs in the RSNA layout to ``out_dir``.

    Args:
        out_dir: created; if it exists it must be empty. The dataset is written to a
            temporary sibling and renamed into place, so a reader never sees half of it.
        images: number of images (patients), at least 1.
        seed: the seed; the same seed and settings give byte-identical files.
        image_size: side of the square images in pixels (the RSNA images are 1024).
            Boxes are drawn in 1024-pixel coordinates and scaled, then rounded to whole
            pixels.
        site_styles: optional acquisition style per site. Image ``i`` belongs to site
            ``i % len(site_styles)``. The site's style changes its pixels (contrast, gamma,
            noise, blur). Its ``magnification`` zooms the anatomy and boxes of the site's
            AP films, which portable units take closer to the source; PA films keep 1.
        positive_rate: share of positive images; None keeps the real rate per view and sex.
    """
    _validate(images=images, seed=seed, image_size=image_size, positive_rate=positive_rate)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output folder {out_dir} exists and is not empty; choose a new folder")
    styles = list(site_styles or [])
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        cases = _write_images(tmp, images=images, seed=seed, image_size=image_size,
                              styles=styles, positive_rate=positive_rate)
        _write_label_files(tmp, cases)
        if styles:
            sites = pd.DataFrame(
                {"patientId": [c.patient_id for c in cases],
                 "site": [i % len(styles) for i in range(len(cases))]}
            )
            atomic.write_csv(tmp / SITES_FILE, sites)
        summary = SynthSummary(
            out_dir=out_dir,
            images=images,
            positives=sum(c.target for c in cases),
            boxes=sum(len(c.boxes) for c in cases),
            image_size=image_size,
            seed=seed,
            seconds=time.perf_counter() - started,
            site_styles=styles,
        )
        atomic.write_json(tmp / SUMMARY_FILE, summary.to_dict())
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote %d synthetic images (%d positive, %d boxes) of %d px to %s in %.1f s (%.3f s/image)",
        summary.images, summary.positives, summary.boxes, image_size, out_dir,
        summary.seconds, summary.seconds_per_image,
    )
    return summary


def sample_case(
    rng: np.random.Generator, *, positive_rate: float | None = None
) -> SynthCase:
    """Draw the header and labels of one image from the real RSNA statistics."""
    patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    view = _draw(rng, real.VIEW_POSITION_PROBS)
    sex = _draw(rng, real.SEX_PROBS_BY_VIEW[view])
    age = _draw_age(rng, view)
    spacing = float(_draw(rng, real.PIXEL_SPACING_PROBS_BY_VIEW[view]))
    rate = real.POSITIVE_RATE_BY_VIEW_SEX[(view, sex)] if positive_rate is None else positive_rate
    target = int(rng.random() < rate)
    finding, boxes = "", ()
    if target:
        class_name = LUNG_OPACITY
        count = int(_draw(rng, real.BOXES_PER_POSITIVE_PROBS_BY_VIEW[view]))
        boxes = sample_boxes(rng, view_position=view, count=count)
    elif rng.random() < real.NORMAL_SHARE_OF_NEGATIVES_BY_VIEW[view]:
        class_name = NORMAL
    else:
        class_name = NOT_NORMAL
        finding = FINDINGS[int(rng.integers(len(FINDINGS)))]
    device = view == "AP" and bool(rng.random() < DEVICE_RATE_AP)
    return SynthCase(patient_id, view, sex, age, spacing, target, class_name, boxes, finding, device)


def sample_boxes(rng: np.random.Generator, *, view_position: str, count: int) -> tuple[Box, ...]:
    """Draw ``count`` boxes of one image in 1024-pixel coordinates.

    How many centres fall in each half follows :data:`LEFT_BOX_COUNT_PROBS`. Width, height
    and centre y come from the per-view quantile tables joined by a Gaussian copula, and
    centre x from the table of its half. A box reaching outside the image is shifted inside, which
    keeps its size (real boxes never leave the image). A box overlapping an earlier one is
    drawn again, up to :data:`MAX_BOX_TRIES` times.
    """
    left = int(_draw(rng, real.LEFT_BOX_COUNT_PROBS[count]))
    sides = ["left"] * left + ["right"] * (count - left)
    correlation = np.asarray(real.BOX_COPULA_CORRELATION_BY_VIEW[view_position])
    factor = np.linalg.cholesky(correlation)
    boxes: list[Box] = []
    for side in sides:
        box = _draw_box(rng, view_position, side, factor)
        for _ in range(MAX_BOX_TRIES - 1):
            if not any(_overlap(box, other) for other in boxes):
                break
            box = _draw_box(rng, view_position, side, factor)
        boxes.append(box)
    return tuple(boxes)


def scale_boxes(boxes: Sequence[Box], *, image_size: int, magnification: float) -> tuple[Box, ...]:
    """Return ``boxes`` zoomed about the centre and scaled to whole pixels of the image.

    Each edge is rounded to the nearest pixel; a box shrinking below one pixel keeps one.
    """
    scale = image_size / real.REFERENCE_SIZE
    centre = real.REFERENCE_SIZE / 2
    out = []
    for box in boxes:
        x0 = (centre + (box.x - centre) * magnification) * scale
        y0 = (centre + (box.y - centre) * magnification) * scale
        x1 = x0 + box.width * magnification * scale
        y1 = y0 + box.height * magnification * scale
        left, top = min(max(round(x0), 0), image_size - 1), min(max(round(y0), 0), image_size - 1)
        right = min(max(round(x1), left + 1), image_size)
        bottom = min(max(round(y1), top + 1), image_size)
        out.append(Box(float(left), float(top), float(right - left), float(bottom - top)))
    return tuple(out)


def random_site_styles(sites: int, *, seed: int) -> list[AcquisitionStyle]:
    """Draw one plausible scanner style per site (:meth:`AcquisitionStyle.random`).

    Each site also gets a geometric magnification in [1.0, 1.1] for its AP films, as from
    a shorter source-to-image distance of its portable units.
    """
    if sites < 1:
        raise ValueError(f"sites must be >= 1; got {sites}")
    rng = np.random.default_rng([seed, _SITE_STYLE_STREAM])
    return [
        replace(AcquisitionStyle.random(rng), magnification=float(rng.uniform(1.0, 1.1)))
        for _ in range(sites)
    ]


def write_rsna_dicom(path: Path, pixels: np.ndarray, case: SynthCase, *, seed: int) -> None:
    """Write ``pixels`` (uint8 [H, W]) as an RSNA-style JPEG Baseline DICOM.

    The JPEG stream comes from Pillow (pydicom 3.0 has no JPEG Baseline encoder) and is
    encapsulated as one fragment. UIDs derive from ``seed`` and the patient id, so files
    are reproducible. PatientAge is written as a valid Age String (``032Y``); the RSNA
    originals hold bare numbers such as ``32``, which the reader accepts too.
    """
    buffer = BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    entropy = [str(seed), case.patient_id]
    sop_uid = generate_uid(entropy_srcs=entropy + ["sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {case.view_position}"
    ds.PatientName = case.patient_id
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.patient_sex
    ds.PatientAge = f"{case.patient_age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.view_position
    ds.StudyInstanceUID = generate_uid(entropy_srcs=entropy + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=entropy + ["series"])
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{case.pixel_spacing:g}", f"{case.pixel_spacing:g}"]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _write_images(
    folder: Path,
    *,
    images: int,
    seed: int,
    image_size: int,
    styles: list[AcquisitionStyle],
    positive_rate: float | None,
) -> list[SynthCase]:
    image_dir = folder / IMAGES_DIR
    image_dir.mkdir()
    cases = []
    progress = tqdm(range(images), desc=f"synth {image_size}px", unit="img",
                    disable=images <= PROGRESS_MIN_IMAGES)
    for index in progress:
        case = sample_case(np.random.default_rng([seed, index, _LABEL_STREAM]),
                           positive_rate=positive_rate)
        style = styles[index % len(styles)] if styles else None
        magnification = 1.0
        if style is not None and case.view_position == "AP":
            magnification = style.magnification
        pixel_rng = np.random.default_rng([seed, index, _PIXEL_STREAM])
        anatomy = draw_anatomy(
            pixel_rng, view_position=case.view_position, finding=case.finding,
            boxes=case.boxes, reference_size=real.REFERENCE_SIZE,
        )
        boxes = scale_boxes(case.boxes, image_size=image_size, magnification=magnification)
        case = replace(case, boxes=boxes)
        image = render_chest(
            pixel_rng, size=image_size, anatomy=anatomy, boxes=boxes, finding=case.finding,
            device=case.device, magnification=magnification,
        )
        if style is not None:
            style_seed = int(np.random.default_rng([seed, index, _STYLE_STREAM]).integers(2**63))
            image = apply_style(image, style, seed=style_seed)
        pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        # Files are written plainly into the temporary folder, which is renamed as a whole.
        write_rsna_dicom(image_dir / f"{case.patient_id}.dcm", pixels, case, seed=seed)
        cases.append(case)
    return cases


def _write_label_files(folder: Path, cases: list[SynthCase]) -> None:
    label_rows, class_rows = [], []
    for case in cases:
        rows = [box.as_list() for box in case.boxes] or [[None] * 4]
        for x, y, width, height in rows:
            label_rows.append((case.patient_id, x, y, width, height, case.target))
            class_rows.append((case.patient_id, case.class_name))
    labels = pd.DataFrame(label_rows, columns=["patientId", "x", "y", "width", "height", "Target"])
    classes = pd.DataFrame(class_rows, columns=["patientId", "class"])
    # Coordinates as "264.0", like the official file; negatives leave them empty.
    for column in ("x", "y", "width", "height"):
        labels[column] = [("" if pd.isna(v) else f"{float(v):.1f}") for v in labels[column]]
    atomic.write_csv(folder / LABELS_FILE, labels)
    atomic.write_csv(folder / CLASS_FILE, classes)


def _draw_box(rng: np.random.Generator, view: str, side: str, factor: np.ndarray) -> Box:
    normal = factor @ rng.standard_normal(3)
    uniform = [0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) for z in normal]
    width = _quantile(real.BOX_WIDTH_QUANTILES_BY_VIEW[view], uniform[0])
    height = _quantile(real.BOX_HEIGHT_QUANTILES_BY_VIEW[view], uniform[1])
    centre_y = _quantile(real.BOX_CENTER_Y_QUANTILES, uniform[2])
    centre_x = _quantile(real.BOX_CENTER_X_QUANTILES_BY_SIDE[side], rng.random())
    side_length = real.REFERENCE_SIZE
    width, height = min(round(width), side_length), min(round(height), side_length)
    x = min(max(round(centre_x - width / 2), 0), side_length - width)
    y = min(max(round(centre_y - height / 2), 0), side_length - height)
    return Box(float(x), float(y), float(width), float(height))


def _quantile(table: Sequence[float], level: float) -> float:
    return float(np.interp(level, real.QUANTILE_LEVELS, table))


def _overlap(a: Box, b: Box) -> bool:
    return (
        a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height
    )


def _draw(rng: np.random.Generator, probabilities: dict):
    keys = list(probabilities)
    weights = np.asarray([probabilities[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _draw_age(rng: np.random.Generator, view: str) -> int:
    weights = np.asarray(real.AGE_BIN_PROBS_BY_VIEW[view], dtype=np.float64)
    start = real.AGE_BIN_STARTS[int(rng.choice(len(weights), p=weights / weights.sum()))]
    return int(start + rng.integers(real.AGE_BIN_WIDTH))


def _validate(*, images: int, seed: int, image_size: int, positive_rate: float | None) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive int; got {images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE} pixels; got {image_size!r}")
    if positive_rate is not None and not 0.0 <= positive_rate <= 1.0:
        raise ValueError(f"positive_rate must lie in [0, 1] or be None; got {positive_rate!r}")
