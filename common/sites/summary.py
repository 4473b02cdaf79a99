"""The per-site summary table of a manifest and the guard rails that read it."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from common.sites.columns import MIX_COLUMNS, MIX_SEPARATOR, STYLE_COLUMNS
from common.sites.frames import AGE_BANDS
from common.sites.settings import HOLDOUT_SITE, HOLDOUT_SPLIT, SPLITS, SiteSettings

log = logging.getLogger(__name__)

MAX_SAMPLE_RATE = 0.25
"""Highest Poisson sample rate ``q = B / n_train`` that passes without a warning.

Poisson subsampling turns a step's privacy loss ``eps0`` into ``log(1 + q (e^eps0 - 1))``
(Balle, Barthe and Gaboardi, "Privacy Amplification by Subsampling: Tight Analyses via
Couplings and Divergences", NeurIPS 2018, arXiv 1807.01647). That is close to
``q * eps0`` only while ``q`` is small. Above 0.25 each step samples more than a quarter of
the site and an epoch has at most 4 steps, so most of the amplification is gone. In other
words, a site needs at least ``4 * B`` training images."""

MIN_EXPECTED_BATCH = 2.0
"""Smallest expected batch ``q * n_train = min(B, n_train)`` that passes without a warning:
below it more than ``e^-2 = 14%`` of the Poisson batches are empty."""

def summarize(
    manifest: pd.DataFrame,
    *,
    expected_batch_size: int | None = None,
    dominant: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Return one row per site (held-out set last, as site -1) describing its data.

    The columns start with ``site``, ``site_name`` (when the manifest has it) and
    ``dominant`` (when given). Counts follow: ``images``, ``patients``, ``train``, ``val``,
    ``test``, ``holdout`` and ``positives``. Then come ``positive_rate`` (positive images /
    images), ``val_positives`` and, with ``expected_batch_size``, ``sample_rate``
    (``min(1, B / train)``). The attribute mix follows as ``<attribute>=<value>`` shares of
    the site's images, and the style columns close the row when the manifest has them.
    """
    sites = sorted(manifest["site"].unique(), key=_site_order)
    by_site = manifest.groupby("site", sort=False)
    table = pd.DataFrame({"site": np.asarray(sites, dtype=np.int64)})
    if "site_name" in manifest.columns:
        table["site_name"] = by_site["site_name"].first().reindex(sites).to_numpy()
    if dominant is not None:
        table["dominant"] = [dominant[s] if s >= 0 else "" for s in sites]
    table["images"] = by_site.size().reindex(sites).to_numpy()
    table["patients"] = by_site["patient_id"].nunique().reindex(sites).to_numpy()
    split_counts = pd.crosstab(manifest["site"], manifest["split"])
    for split in (*SPLITS, HOLDOUT_SPLIT):
        counts = split_counts[split] if split in split_counts.columns else pd.Series(dtype=int)
        table[split] = counts.reindex(sites, fill_value=0).to_numpy()
    table["positives"] = by_site["target"].sum().reindex(sites).to_numpy()
    table["positive_rate"] = table["positives"] / table["images"]
    validation = manifest[manifest["split"] == "val"].groupby("site")["target"].sum()
    table["val_positives"] = validation.reindex(sites, fill_value=0).to_numpy()
    if expected_batch_size is not None:
        train = table["train"].to_numpy(dtype=float)
        rate = np.minimum(1.0, expected_batch_size / np.maximum(train, 1.0))
        table["sample_rate"] = np.where(train > 0, rate, np.nan)
    for column, shares in _attribute_mix(manifest, sites).items():
        table[column] = shares
    for column in STYLE_COLUMNS.values():
        if column in manifest.columns:
            table[column] = by_site[column].first().reindex(sites).to_numpy()
    return table


def _site_order(site: int) -> tuple[int, int]:
    return (1, 0) if site == HOLDOUT_SITE else (0, int(site))


def _attribute_mix(manifest: pd.DataFrame, sites: list[int]) -> dict[str, np.ndarray]:
    mix: dict[str, np.ndarray] = {}
    for attribute in MIX_COLUMNS:
        if attribute not in manifest.columns:
            continue
        known = manifest[manifest[attribute] != ""]
        if known.empty:
            continue
        shares = pd.crosstab(known["site"], known[attribute]).reindex(sites, fill_value=0)
        shares = shares.div(manifest.groupby("site").size().reindex(sites), axis=0)
        for value in _value_order(attribute, shares.columns):
            mix[f"{attribute}{MIX_SEPARATOR}{value}"] = shares[value].to_numpy(dtype=float)
    return mix


def _value_order(attribute: str, values: pd.Index) -> list[str]:
    if attribute == "age_band":
        band_order = [name for name, _, _ in AGE_BANDS]
        return sorted(values, key=lambda v: band_order.index(v) if v in band_order else len(band_order))
    return sorted(values)


def check_min_site_size(
    images: dict[int, int], settings: SiteSettings, names: tuple[str, ...] | None = None
) -> None:
    """Raise when a site has fewer than ``settings.min_site_size`` images.

    The message names every such site with its size and the setting to change for the
    setup in use.
    """
    small = {site: size for site, size in sorted(images.items()) if size < settings.min_site_size}
    if not small:
        return
    described = ", ".join(
        f"site {site}{f' ({names[site]!r})' if names else ''} has {size}"
        for site, size in small.items()
    )
    raise ValueError(
        f"{described} images, below the minimum site size {settings.min_site_size}; "
        f"{_size_fix(settings)}"
    )


def _size_fix(settings: SiteSettings) -> str:
    lower = f"or lower --min-site-size (now {settings.min_site_size})"
    if settings.setup == "label-skew":
        return f"raise --alpha (now {settings.alpha}) for more even sites, use fewer --sites, {lower}"
    if settings.setup == "attribute":
        return (
            f"raise --purity (now {settings.purity}) so that sites dominated by a rare value "
            f"grow, use fewer --sites, {lower}"
        )
    if settings.setup == "column":
        return f"merge or drop that site in column {settings.site_column!r}, {lower}"
    return f"use fewer --sites (now {settings.num_sites}) {lower}"


def guard_rail_warnings(summary: pd.DataFrame, settings: SiteSettings) -> list[str]:
    """Log and return the warnings about sites that will train or validate poorly.

    Per site, with ``B = expected_batch_size`` and ``n`` its training images:

    - ``q = B / n > MAX_SAMPLE_RATE``, i.e. ``n < 4 B``: Poisson subsampling amplifies
      privacy little (at ``n <= B`` every step uses the whole site);
    - expected batch ``min(B, n) < MIN_EXPECTED_BATCH``: many steps have an empty batch,
      with probability ``(1 - q) ** n`` each;
    - a site without any positive image, or a validation split with no image (while the
      val ratio is positive) or no positive image;
    - a held-out set without a positive image.
    """
    messages: list[str] = []
    batch = settings.expected_batch_size
    for row in summary.itertuples(index=False):
        if row.site == HOLDOUT_SITE:
            if row.positives == 0:
                messages.append(f"the held-out test set ({row.images} images) has no positive image")
            continue
        messages.extend(_batch_warnings(int(row.site), int(row.train), batch))
        messages.extend(_validation_warnings(row, settings))
    for message in messages:
        log.warning("%s", message)
    return messages


def _batch_warnings(site: int, train: int, batch: int) -> list[str]:
    if train == 0:
        return []
    rate = min(1.0, batch / train)
    messages = []
    if train <= batch:
        messages.append(
            f"site {site}: the expected batch size {batch} is at least its {train} training "
            "images, so every step uses the whole site and subsampling amplifies no privacy; "
            "use a smaller --batch-size or larger sites"
        )
    elif rate > MAX_SAMPLE_RATE:
        messages.append(
            f"site {site}: sample_rate q = {batch}/{train} = {rate:.2f} is above "
            f"{MAX_SAMPLE_RATE}, so Poisson subsampling amplifies privacy little; use a "
            f"smaller --batch-size or sites with at least {math.ceil(batch / MAX_SAMPLE_RATE)} "
            "training images"
        )
    expected = rate * train
    if expected < MIN_EXPECTED_BATCH:
        empty = (1.0 - rate) ** train
        messages.append(
            f"site {site}: the expected Poisson batch is {expected:.2f} images and "
            f"{empty:.0%} of the batches are empty; use --batch-size {MIN_EXPECTED_BATCH:.0f} "
            "or more"
        )
    return messages


def _validation_warnings(row, settings: SiteSettings) -> list[str]:
    if settings.split_ratios[1] == 0:
        return []
    if row.val == 0:
        return [f"site {row.site} has no validation image; raise the val ratio of --split or use larger sites"]
    if row.positives == 0:
        fix = f"raise --alpha (now {settings.alpha})" if settings.setup == "label-skew" else "use fewer --sites"
        return [
            f"site {row.site} has no positive image in any split, so Dice on positives cannot be "
            f"measured there; {fix}"
        ]
    if row.val_positives == 0:
        return [
            f"site {row.site}: its {row.val} validation images include no positive image, so Dice "
            "on positives cannot be measured there; use fewer --sites or a larger val ratio"
        ]
    return []
