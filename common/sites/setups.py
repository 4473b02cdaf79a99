"""Site assignment of patients for each setup of :data:`common.sites.settings.SETUPS`.

Every function takes one row per patient (``units``, with an int ``label`` column and,
depending on the setup, ``class_name``, ``value`` or ``site_value``) and returns the site
of every patient. All allocations hand out exact counts, so coverage is complete.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.sites.allocation import deal, largest_remainder, stream_rng
from common.sites.frames import UNKNOWN_CLASS_NAMES
from common.sites.settings import SiteSettings
from common.style import AcquisitionStyle

log = logging.getLogger(__name__)

_PURITY_SEARCH_STEPS = 40


@dataclass(frozen=True)
class SiteAssignment:
    """The site of every patient and what each site stands for.

    Attributes:
        sites: site id (``0..num_sites-1``) of every unit, in the order of ``units``.
        num_sites: number of sites ``K``.
        names: ``column`` setup only: the original site name of each site id.
        dominant: ``attribute`` setup only: the dominant value of each site id.
    """

    sites: np.ndarray
    num_sites: int
    names: tuple[str, ...] | None = None
    dominant: tuple[str, ...] | None = None


def assign_sites(units: pd.DataFrame, settings: SiteSettings) -> SiteAssignment:
    """Return the site of every unit as ``settings.setup`` prescribes (seeded by ``seed``)."""
    rng = stream_rng(settings.seed, "sites")
    if settings.setup in ("iid", "scanner-shift"):
        return _assign_iid(units, settings, rng)
    if settings.setup == "label-skew":
        return _assign_label_skew(units, settings, rng)
    if settings.setup == "quantity-skew":
        return _assign_quantity_skew(units, settings, rng)
    if settings.setup == "attribute":
        return _assign_attribute(units, settings, rng)
    return _assign_column(units, settings)


def _assign_iid(units: pd.DataFrame, settings: SiteSettings, rng: np.random.Generator) -> SiteAssignment:
    """Equal sites (within one patient) with equal label proportions (within one patient
    per label): stratified random allocation."""
    num_sites = int(settings.num_sites)
    sizes = rng.permutation(largest_remainder(np.ones(num_sites), len(units)))
    return SiteAssignment(deal(units["label"].to_numpy(), sizes, rng), num_sites)


def quantity_skew_sizes(num_patients: int, settings: SiteSettings, rng: np.random.Generator) -> np.ndarray:
    """Return the site sizes in patients: ``min_site_size`` each plus a share of the rest.

    The shares of the ``n - K * min_site_size`` remaining patients are either a draw from
    ``Dirichlet(alpha, ..., alpha)`` or the power law ``(rank + 1) ** -power_exponent``
    (normalised) with the ranks in random order, so the largest site is not always site 0.

    Raises:
        ValueError: when ``n < K * min_site_size``.
    """
    num_sites, floor = int(settings.num_sites), settings.min_site_size
    spare = num_patients - num_sites * floor
    if spare < 0:
        raise ValueError(
            f"{num_patients} patients cannot fill {num_sites} sites of at least {floor} "
            "patients each; lower --min-site-size or --sites"
        )
    if settings.size_distribution == "dirichlet":
        shares = rng.dirichlet(np.full(num_sites, settings.alpha))
    else:
        shares = rng.permutation((np.arange(num_sites) + 1.0) ** -settings.power_exponent)
    return floor + largest_remainder(shares, spare)


def _assign_quantity_skew(
    units: pd.DataFrame, settings: SiteSettings, rng: np.random.Generator
) -> SiteAssignment:
    sizes = quantity_skew_sizes(len(units), settings, rng)
    return SiteAssignment(deal(units["label"].to_numpy(), sizes, rng), int(settings.num_sites))


def label_strata(units: pd.DataFrame) -> np.ndarray:
    """Return the class each patient is skewed by: ``class_name`` when the records have
    classes, else ``target=<label>``; patients without a class fall back to their target."""
    fallback = "target=" + units["label"].astype(str)
    if "class_name" not in units.columns:
        return fallback.to_numpy()
    missing = units["class_name"].isin(UNKNOWN_CLASS_NAMES)
    if missing.all():
        return fallback.to_numpy()
    if missing.any():
        log.warning(
            "%d of %d patients have no class_name; label-skew treats them by target instead",
            int(missing.sum()), len(units),
        )
    return units["class_name"].where(~missing, fallback).to_numpy()


def _assign_label_skew(
    units: pd.DataFrame, settings: SiteSettings, rng: np.random.Generator
) -> SiteAssignment:
    """Split every class over the sites by its own ``Dirichlet(alpha)`` draw.

    This is the "distribution-based label imbalance" of Li, Diao, Chen and He, "Federated
    Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022 (arXiv 2102.02079):
    class ``c`` gives site ``k`` the share ``p_ck`` with ``p_c ~ Dir(alpha * 1_K)``. Site
    sizes vary as a consequence; a large ``alpha`` gives every site the global proportions.
    """
    num_sites = int(settings.num_sites)
    strata = label_strata(units)
    sites = np.empty(len(units), dtype=np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        shares = rng.dirichlet(np.full(num_sites, settings.alpha))
        counts = largest_remainder(shares, members.size)
        sites[members] = deal(np.zeros(members.size), counts, rng)
    return SiteAssignment(sites, num_sites)


def attribute_counts(value_counts: np.ndarray, *, num_sites: int, purity: float) -> np.ndarray:
    """Return how many patients of each attribute value each site gets (``K x V`` ints).

    Site ``k`` is dominated by value ``d(k) = k mod V``. A fraction ``purity`` of its
    patients carries ``d(k)``; the other ``1 - purity`` carry the other values in
    proportion to their global counts, ``n_v / (n - n_d(k))``. With ``S_u`` the total size
    of the sites dominated by ``u``, using every patient exactly once means, for every
    value ``v``::

        n_v = purity * S_v + (1 - purity) * sum_{u != v} S_u * n_v / (n - n_u)

    a ``V x V`` linear system, non-singular for ``purity > 1/2``. The ``g_u`` sites
    dominated by ``u`` share ``S_u`` equally. Each column is rounded with the largest
    remainder method, so the value totals stay exact and the site sizes move by at most
    ``V`` patients.

    Raises:
        ValueError: when ``K < V``, a value is absent, or ``purity`` is too low for the
            data (a group size would be negative); the message gives the lowest purity
            that works.
    """
    counts = np.asarray(value_counts, dtype=float)
    num_values = counts.size
    if num_sites < num_values:
        raise ValueError(
            f"the attribute has {num_values} values and each needs a site it dominates, "
            f"so --sites must be at least {num_values}; got {num_sites}"
        )
    if np.any(counts <= 0) or num_values < 2:
        raise ValueError(f"attribute splits need at least 2 values present; counts {counts.tolist()}")
    group_sizes = _group_sizes(counts, purity)
    if group_sizes.min() < 0:
        # Rounded up, so that the purity printed is itself feasible.
        lowest = math.ceil(_lowest_feasible_purity(counts, purity) * 1000) / 1000
        raise ValueError(
            f"purity {purity} is infeasible for value counts {counts.astype(int).tolist()}: the "
            "other sites would need more of the rarer values than exist; raise --purity to at "
            f"least {lowest:.3f}"
        )
    dominant = np.arange(num_sites) % num_values
    sites_per_value = np.bincount(dominant, minlength=num_values)
    site_sizes = group_sizes[dominant] / sites_per_value[dominant]
    total = counts.sum()
    others = (1.0 - purity) * counts[None, :] / (total - counts[dominant])[:, None]
    shares = np.where(np.eye(num_values, dtype=bool)[dominant], purity, others)
    real = site_sizes[:, None] * shares
    return np.stack(
        [largest_remainder(real[:, v], int(counts[v])) for v in range(num_values)], axis=1
    )


def _group_sizes(counts: np.ndarray, purity: float) -> np.ndarray:
    total = counts.sum()
    system = (1.0 - purity) * counts[:, None] / (total - counts[None, :])
    np.fill_diagonal(system, purity)
    sizes = np.linalg.solve(system, counts)
    # Round-off of a boundary case (a size of exactly 0) must not read as infeasible.
    return np.where(np.abs(sizes) < 1e-9 * total, 0.0, sizes)


def _lowest_feasible_purity(counts: np.ndarray, infeasible: float) -> float:
    # Purity 1 is always feasible (every site pure), so bisect on (infeasible, 1].
    low, high = infeasible, 1.0
    for _ in range(_PURITY_SEARCH_STEPS):
        middle = (low + high) / 2
        if _group_sizes(counts, middle).min() < 0:
            low = middle
        else:
            high = middle
    return high


def _assign_attribute(
    units: pd.DataFrame, settings: SiteSettings, rng: np.random.Generator
) -> SiteAssignment:
    num_sites = int(settings.num_sites)
    values, codes = np.unique(units["value"].to_numpy(), return_inverse=True)
    if values.size < 2:
        raise ValueError(
            f"attribute {settings.attribute!r} has the single value {values.tolist()} in these "
            "records; an attribute split needs at least 2 values"
        )
    matrix = attribute_counts(
        np.bincount(codes.ravel(), minlength=values.size), num_sites=num_sites,
        purity=settings.purity,
    )
    labels = units["label"].to_numpy()
    sites = np.empty(len(units), dtype=np.int64)
    for code in range(values.size):
        members = np.flatnonzero(codes.ravel() == code)
        sites[members] = deal(labels[members], matrix[:, code], rng)
    dominant = tuple(str(values[k % values.size]) for k in range(num_sites))
    return SiteAssignment(sites, num_sites, dominant=dominant)


def column_site_names(values: pd.Series) -> tuple[str, ...]:
    """Return the distinct site names sorted: numerically when all are integers, else as text."""
    names = sorted(set(values.astype(str)))
    if all(_is_integer(name) for name in names):
        return tuple(sorted(names, key=int))
    return tuple(names)


def _assign_column(units: pd.DataFrame, settings: SiteSettings) -> SiteAssignment:
    names = column_site_names(units["site_value"])
    if settings.num_sites is not None and settings.num_sites != len(names):
        raise ValueError(
            f"--sites {settings.num_sites} does not match the {len(names)} sites of column "
            f"{settings.site_column!r} ({', '.join(names)}); omit --sites or fix the column"
        )
    index = {name: site for site, name in enumerate(names)}
    sites = units["site_value"].astype(str).map(index).to_numpy(dtype=np.int64)
    return SiteAssignment(sites, len(names), names=names)


def scanner_styles(num_sites: int, *, seed: int, strength: float) -> dict[int, AcquisitionStyle]:
    """Return one acquisition style per site, drawn from the seed and the site id only.

    Magnification stays 1: it would move the lesions, so masks and boxes would no longer
    match the image at load time.
    """
    styles = {}
    for site in range(num_sites):
        style = AcquisitionStyle.random(stream_rng(seed, "styles", site), strength=strength)
        styles[site] = style
    return styles


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
