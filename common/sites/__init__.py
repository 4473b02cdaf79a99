"""Simulated hospital sites: partitions of a chest X-ray dataset with patient-level splits.

RSNA has no hospital field, so sites are simulated the ways hospitals differ: size
(``quantity-skew``), disease prevalence (``label-skew``), patient mix (``attribute``:
AP vs PA films, sex, age band) and scanner appearance (``scanner-shift``). The ``column``
setup uses a site column the data already has. :func:`partition` returns the manifest (one
row per image) and a per-site summary; :func:`write_manifest` and :func:`read_manifest`
store and load it.

The names below load their module on first use (PEP 562), so that importing the
light settings module, as ``dpfedseg --help`` does, does not import pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AGE_BANDS": "common.sites.frames",
    "read_records_csv": "common.sites.frames",
    "rsna_metadata_frame": "common.sites.frames",
    "validate_records": "common.sites.frames",
    "ManifestFiles": "common.sites.manifest",
    "Partition": "common.sites.manifest",
    "read_manifest": "common.sites.manifest",
    "read_manifest_sidecar": "common.sites.manifest",
    "site_ids": "common.sites.manifest",
    "site_sizes": "common.sites.manifest",
    "site_style": "common.sites.manifest",
    "write_manifest": "common.sites.manifest",
    "partition": "common.sites.partition",
    "partition_records": "common.sites.partition",
    "ATTRIBUTES": "common.sites.settings",
    "HOLDOUT_SITE": "common.sites.settings",
    "HOLDOUT_SPLIT": "common.sites.settings",
    "SETUPS": "common.sites.settings",
    "SPLITS": "common.sites.settings",
    "SiteSettings": "common.sites.settings",
    "summarize": "common.sites.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
