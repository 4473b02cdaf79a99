"""Simulated hospital sites: partitions of a chest X-ray dataset with patient-level splits.

RSNA has no hospital field, so sites are simulated the ways hospitals differ: size
(``quantity-skew``), disease prevalence (``label-skew``), patient mix (``attribute``:
AP vs PA films, sex, age band) and scanner appearance (``scanner-shift``); ``column``
uses a site column the data already has. :func:`partition` returns the manifest (one
row per image) and a per-site summary; :func:`write_manifest` and :func:`read_manifest`
store and load it.
"""

from common.sites.frames import AGE_BANDS, read_records_csv, rsna_metadata_frame, validate_records
from common.sites.manifest import (
    ManifestFiles,
    Partition,
    read_manifest,
    read_manifest_sidecar,
    site_ids,
    site_sizes,
    site_style,
    write_manifest,
)
from common.sites.partition import partition, partition_records
from common.sites.settings import ATTRIBUTES, HOLDOUT_SITE, HOLDOUT_SPLIT, SETUPS, SPLITS, SiteSettings
from common.sites.summary import summarize

__all__ = [
    "AGE_BANDS",
    "ATTRIBUTES",
    "HOLDOUT_SITE",
    "HOLDOUT_SPLIT",
    "ManifestFiles",
    "Partition",
    "SETUPS",
    "SPLITS",
    "SiteSettings",
    "partition",
    "partition_records",
    "read_manifest",
    "read_manifest_sidecar",
    "read_records_csv",
    "rsna_metadata_frame",
    "site_ids",
    "site_sizes",
    "site_style",
    "summarize",
    "validate_records",
    "write_manifest",
]
