"""Column names of the site manifest and of its per-site summary."""

from __future__ import annotations

REQUIRED_COLUMNS = ("patient_id", "site", "split", "target")
"""Columns every manifest has: one row per image."""

TEXT_COLUMNS = ("image_id", "site_name", "class_name", "ViewPosition", "PatientSex", "age_band")
"""Optional text columns (``""`` when missing). ``site_name`` keeps a ``column`` setup's
original site names; ``image_id`` is carried over when the records have one."""

AGE_COLUMN = "PatientAge"
"""Optional age column in whole years (empty when unknown)."""

STYLE_COLUMNS = {
    "contrast": "style_contrast",
    "gamma": "style_gamma",
    "noise_std": "style_noise_std",
    "blur_sigma": "style_blur_sigma",
}
"""``AcquisitionStyle`` field -> manifest column of a ``scanner-shift`` site's style.
Magnification is not stored because it stays 1 at load time."""

MIX_COLUMNS = ("ViewPosition", "PatientSex", "age_band", "class_name")
"""Attributes whose per-site shares the summary reports, as columns ``<attribute>=<value>``."""

MIX_SEPARATOR = "="

COLUMN_ORDER = (
    "patient_id", "image_id", "site", "site_name", "split", "target", "class_name",
    "ViewPosition", "PatientSex", AGE_COLUMN, "age_band", *STYLE_COLUMNS.values(),
)
