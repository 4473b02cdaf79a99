"""Issues of a dataset load (skipped or repaired items), their counts, and the failure check.

Every bad item of a load becomes one :class:`Issue` (kind, location, message). The first
few issues of each kind are logged as warnings, the rest are counted and summarised in one
line, so a folder of 26,000 files with a systematic problem does not flood the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Kinds of issue, grouped by what happened to the item.
FAILED_IMAGE_KINDS = (
    "unreadable_file",  # not a DICOM/PNG/JPEG, or truncated before or inside the pixel data
    "no_pixel_data",  # a DICOM without a Pixel Data element (a report, a structured document)
    "unsupported_image",  # multi-frame, zero-sized or otherwise not one 2-D image
    "decode_failed",  # pixel data present but the codec failed
    "bad_mask",  # folder layout: mask unreadable or of another size than its image
    "positive_without_boxes",  # every box row of a positive patient was rejected
)
"""Items removed because they are broken; they count towards the failure fraction."""

REJECTED_ROW_KINDS = (
    "malformed_row",  # wrong number of fields or an empty patientId
    "invalid_target",  # Target not 0 or 1
    "bad_coordinates",  # a positive row with missing or non-numeric x, y, width or height
    "box_dropped",  # a box of non-positive width or height, or wholly outside the image
)
"""Label rows removed; they count towards the failure fraction of the labels file."""

REPAIRED_KINDS = (
    "box_clipped",  # a box partly outside the image, clipped to it
    "duplicate_row",  # an exact repeat of an earlier label row, dropped
    "coordinates_on_negative",  # a Target 0 row with a box, box ignored
    "conflicting_target",  # a patient with Target 0 and Target 1 rows, positive kept
    "class_mismatch",  # class file disagrees with the labels, labels win
    "class_conflict",  # one patient with several classes in the class file
    "missing_class",  # patient absent from the class file, class derived from Target
    "mask_values",  # mask values other than 0/1 or 0/255, thresholded
    "implausible_age",  # PatientAge above MAX_PLAUSIBLE_AGE years, kept as read
)
"""Items kept after a repair."""

SKIPPED_KINDS = (
    "missing_image",  # a label row (or mask) whose image file is absent
    "unlabeled_image",  # an image without a label row (or without a mask)
    "duplicate_image",  # two image files with one id (say a.png and a.jpg)
    "unknown_patient",  # a class or metadata row whose patient has no label row
)
"""Items left out because a counterpart is missing; they do not count as failures, so a
folder holding only part of the images still loads."""

ALL_KINDS = FAILED_IMAGE_KINDS + REJECTED_ROW_KINDS + REPAIRED_KINDS + SKIPPED_KINDS

WARNINGS_PER_KIND = 10
"""Issues of one kind logged one by one before the rest are only counted."""

MAX_PLAUSIBLE_AGE = 120
"""Ages above this many years are reported as implausible (the RSNA headers hold 148-155)."""


@dataclass(frozen=True)
class Issue:
    """One skipped or repaired item: ``kind`` from :data:`ALL_KINDS`, where it sits, and why."""

    kind: str
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """Return the issue as a JSON-ready mapping."""
        return {"kind": self.kind, "location": self.location, "message": self.message}


@dataclass
class LoadReport:
    """Every issue of one load plus the denominators of the failure fractions.

    Attributes:
        label_rows: data rows read from the labels file (0 for the folder layout).
        images_checked: image files that were opened (header read, or decoded).
        decoded: whether pixels were decoded, so that ``decode_failed`` is meaningful.
        issues: every issue, in the order found.
    """

    label_rows: int = 0
    images_checked: int = 0
    decoded: bool = False
    issues: list[Issue] = field(default_factory=list)
    _logged: Counter = field(default_factory=Counter, repr=False)

    def add(self, kind: str, location: str, message: str, *, warn: bool = True) -> None:
        """Record an issue and log it as a warning unless its kind was logged often enough.

        With ``warn`` False the issue is only recorded, neither logged nor counted by
        :meth:`log_suppressed`.
        """
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown issue kind {kind!r}; valid kinds: {', '.join(ALL_KINDS)}")
        self.issues.append(Issue(kind, location, message))
        if not warn:
            return
        self._logged[kind] += 1
        if self._logged[kind] <= WARNINGS_PER_KIND:
            log.warning("%s: %s", location, message)

    def log_suppressed(self) -> None:
        """Log one line per kind whose warnings were cut off after :data:`WARNINGS_PER_KIND`."""
        for kind, count in sorted(self._logged.items()):
            if count > WARNINGS_PER_KIND:
                log.warning(
                    "%d more %s issues not logged one by one (%d in all); "
                    "`dpfedseg data inspect --json` lists every one",
                    count - WARNINGS_PER_KIND,
                    kind,
                    count,
                )

    def counts(self) -> dict[str, int]:
        """Return ``{kind: number of issues}`` for every kind, zeros included."""
        found = Counter(issue.kind for issue in self.issues)
        return {kind: found.get(kind, 0) for kind in ALL_KINDS}

    def of_kind(self, kind: str) -> list[Issue]:
        """Return the issues of one kind, in the order found."""
        return [issue for issue in self.issues if issue.kind == kind]

    @property
    def failed_images(self) -> int:
        """Number of images removed because they are broken."""
        return sum(1 for issue in self.issues if issue.kind in FAILED_IMAGE_KINDS)

    @property
    def rejected_rows(self) -> int:
        """Number of label rows removed."""
        return sum(1 for issue in self.issues if issue.kind in REJECTED_ROW_KINDS)

    def check_failure_fraction(
        self, *, kept_images: int, max_failure_fraction: float, source: str
    ) -> None:
        """Raise ``ValueError`` when too large a share of images or label rows failed.

        See :func:`check_failure_fraction`; the counts come from this report's issues.
        """
        check_failure_fraction(
            failed_images=self.failed_images,
            kept_images=kept_images,
            rejected_rows=self.rejected_rows,
            label_rows=self.label_rows,
            max_failure_fraction=max_failure_fraction,
            source=f"{source} (issues by kind: {self._nonzero_counts()})",
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready mapping (counts and every issue)."""
        return {
            "label_rows": self.label_rows,
            "images_checked": self.images_checked,
            "decoded": self.decoded,
            "failed_images": self.failed_images,
            "rejected_rows": self.rejected_rows,
            "issue_counts": self.counts(),
            "issues": [issue.to_dict() for issue in self.issues],
        }

    def _nonzero_counts(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts().items() if v) or "none"


def validate_failure_fraction(max_failure_fraction: float) -> None:
    """Raise ``ValueError`` unless ``max_failure_fraction`` lies in [0, 1]."""
    if not 0.0 <= max_failure_fraction <= 1.0:
        raise ValueError(f"max_failure_fraction must lie in [0, 1]; got {max_failure_fraction!r}")


def check_failure_fraction(
    *,
    failed_images: int,
    kept_images: int,
    rejected_rows: int,
    label_rows: int,
    max_failure_fraction: float,
    source: str,
) -> None:
    """Raise ``ValueError`` when too large a share of images or label rows failed.

    The image fraction is ``failed_images / (kept_images + failed_images)``; the row
    fraction is ``rejected_rows / label_rows``. Missing and unlabeled images are not
    failures. A fraction equal to ``max_failure_fraction`` still passes.
    """
    image_fraction, row_fraction = failure_fractions(
        failed_images=failed_images,
        kept_images=kept_images,
        rejected_rows=rejected_rows,
        label_rows=label_rows,
    )
    for what, fraction, failed, total in (
        ("images", image_fraction, failed_images, kept_images + failed_images),
        ("label rows", row_fraction, rejected_rows, label_rows),
    ):
        if fraction > max_failure_fraction:
            raise ValueError(
                f"{source}: {failed} of {total} {what} failed ({fraction:.1%}), more than "
                f"max_failure_fraction {max_failure_fraction:.1%}. Fix the files listed in the "
                "warnings, or raise max_failure_fraction to load the rest anyway"
            )


def failure_fractions(
    *, failed_images: int, kept_images: int, rejected_rows: int, label_rows: int
) -> tuple[float, float]:
    """Return ``(failed image share, rejected label-row share)``, 0 where nothing was read."""
    attempted = kept_images + failed_images
    image_fraction = failed_images / attempted if attempted else 0.0
    row_fraction = rejected_rows / label_rows if label_rows else 0.0
    return image_fraction, row_fraction
