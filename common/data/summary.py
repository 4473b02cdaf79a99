"""The inspection summary of a loaded dataset: counts, mixes and every issue."""

from __future__ import annotations

from collections import Counter
from typing import Any

from common.data.records import LoadedDataset
from common.data.report import (
    FAILED_IMAGE_KINDS,
    REJECTED_ROW_KINDS,
    REPAIRED_KINDS,
    SKIPPED_KINDS,
    failure_fractions,
)
from common.sites.frames import AGE_BANDS

UNKNOWN = "unknown"
WIDTH = 18  # label column of the human-readable table
NOT_CHECKED_LABELS_ONLY = "not checked (label files only, no image folder)"

LABEL_MISMATCH_KINDS = (
    "missing_image",
    "unlabeled_image",
    "class_mismatch",
    "class_conflict",
    "missing_class",
    "conflicting_target",
    "unknown_patient",
)
"""Issue kinds where two sources of labels or files disagree."""


def summarize(
    loaded: LoadedDataset, *, max_failure_fraction: float = 0.1, labels_only: bool = False
) -> dict[str, Any]:
    """Return the counts ``dpfedseg data inspect`` shows, as a JSON-ready mapping.

    ``images`` counts records, and ``image_files_found`` those whose file exists.
    ``decode_failures`` is None when the pixels were not decoded. ``would_load`` is
    whether :func:`common.data.load_dataset` accepts the folder at ``max_failure_fraction``.

    ``labels_only`` marks a folder inspected without its images: its ``missing_image``
    issues are left out, because every image is absent by design, and
    ``image_files_found``, ``failed_image_fraction`` and ``would_load`` are None.
    """
    records = loaded.records
    report = loaded.report
    issues = report.issues
    counts = report.counts()
    if labels_only:
        issues = [issue for issue in issues if issue.kind != "missing_image"]
        counts["missing_image"] = 0
    kept = len(records)
    image_fraction, row_fraction = failure_fractions(
        failed_images=report.failed_images,
        kept_images=kept,
        rejected_rows=report.rejected_rows,
        label_rows=report.label_rows,
    )
    return {
        "root": str(loaded.root),
        "layout": loaded.layout,
        "images": kept,
        "labels_only": labels_only,
        "image_files_found": (
            None if labels_only else sum(1 for r in records if r.image_path.is_file())
        ),
        "positives": sum(r.target for r in records),
        "negatives": sum(1 - r.target for r in records),
        "boxes": sum(len(r.boxes) for r in records) if loaded.layout == "rsna" else None,
        "label_rows": report.label_rows,
        "classes": _mix(r.class_name for r in records),
        "view_position": _mix(r.metadata.view_position for r in records),
        "sex": _mix(r.metadata.patient_sex for r in records),
        "age": _mix(_age_band(r.metadata.patient_age) for r in records),
        "modality": _mix(r.metadata.modality for r in records),
        "decoded": report.decoded,
        "decode_failures": counts["decode_failed"] if report.decoded else None,
        "failed_images": {k: counts[k] for k in FAILED_IMAGE_KINDS},
        "rejected_rows": {k: counts[k] for k in REJECTED_ROW_KINDS},
        "repaired": {k: counts[k] for k in REPAIRED_KINDS},
        "skipped": {k: counts[k] for k in SKIPPED_KINDS},
        "label_mismatches": {k: counts[k] for k in LABEL_MISMATCH_KINDS},
        "failed_image_fraction": None if labels_only else image_fraction,
        "rejected_row_fraction": row_fraction,
        "max_failure_fraction": max_failure_fraction,
        "would_load": (
            None
            if labels_only
            else kept > 0 and max(image_fraction, row_fraction) <= max_failure_fraction
        ),
        "issues": [issue.to_dict() for issue in issues],
    }


def format_summary(summary: dict[str, Any], *, max_issues: int = 20) -> str:
    """Return ``summary`` as a human-readable table with the first ``max_issues`` issues."""
    lines = [
        f"{'dataset':<{WIDTH}}{summary['root']} ({summary['layout']} layout)",
        f"{'images':<{WIDTH}}{summary['images']}  (positive {summary['positives']}, "
        f"negative {summary['negatives']})",
    ]
    if summary["labels_only"]:
        lines.append(f"{'image files':<{WIDTH}}{NOT_CHECKED_LABELS_ONLY}")
    elif summary["image_files_found"] != summary["images"]:
        lines.append(f"{'image files found':<{WIDTH}}{summary['image_files_found']}")
    if summary["boxes"] is not None:
        lines.append(f"{'boxes':<{WIDTH}}{summary['boxes']}  (label rows {summary['label_rows']})")
    for key, title in (("classes", "classes"), ("view_position", "ViewPosition"),
                       ("sex", "PatientSex"), ("age", "PatientAge"), ("modality", "Modality")):
        lines.append(f"{title:<{WIDTH}}{_format_mix(summary[key])}")

    lines.append(f"{'decode failures':<{WIDTH}}{_format_decode_failures(summary)}")

    for key, title in (("failed_images", "failed images"), ("rejected_rows", "rejected rows"),
                       ("repaired", "repaired"), ("skipped", "skipped"),
                       ("label_mismatches", "label mismatches")):
        lines.append(f"{title:<{WIDTH}}{_format_counts(summary[key])}")
    lines.append(f"{'failure share':<{WIDTH}}{_format_failure_share(summary)}")

    issues = summary["issues"]
    if issues:
        lines.append(f"issues ({len(issues)}; --json lists all):")
        for issue in issues[:max_issues]:
            lines.append(f"  [{issue['kind']}] {issue['location']}: {issue['message']}")
        if len(issues) > max_issues:
            lines.append(f"  ... {len(issues) - max_issues} more")
    return "\n".join(lines)


def _format_decode_failures(summary: dict[str, Any]) -> str:
    if summary["labels_only"]:
        return NOT_CHECKED_LABELS_ONLY
    decode = summary["decode_failures"]
    return str(decode) if decode is not None else "not checked (--no-decode)"


def _format_failure_share(summary: dict[str, Any]) -> str:
    rows = f"label rows {summary['rejected_row_fraction']:.1%}"
    if summary["labels_only"]:
        # Whether the folder loads depends on its images, which were not read.
        return f"{rows}; images not checked, so no load verdict"
    verdict = "loads" if summary["would_load"] else "would NOT load"
    return (
        f"images {summary['failed_image_fraction']:.1%}, {rows}: {verdict} at "
        f"max_failure_fraction {summary['max_failure_fraction']:.0%}"
    )


def _mix(values) -> dict[str, int]:
    counter = Counter(UNKNOWN if value is None else str(value) for value in values)
    return dict(sorted(counter.items()))


def _age_band(age: int | None) -> str | None:
    """Return the band of ``age`` that site partitions use too, None if unknown or below 0."""
    if age is None:
        return None
    inside = (name for name, low, high in AGE_BANDS if age >= low and (high is None or age < high))
    return next(inside, None)


def _format_mix(mix: dict[str, int]) -> str:
    total = sum(mix.values())
    if not total:
        return "-"
    return ", ".join(f"{name} {count} ({count / total:.0%})" for name, count in mix.items())


def _format_counts(counts: dict[str, int]) -> str:
    nonzero = {k: v for k, v in counts.items() if v}
    return ", ".join(f"{k} {v}" for k, v in nonzero.items()) if nonzero else "none"
