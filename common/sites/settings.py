"""The settings of one site partition, validated once when the object is built."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from common.config import _check_choice, _check_range

SETUPS = ("iid", "label-skew", "quantity-skew", "attribute", "scanner-shift", "column")
"""Site setups, one per way sites differ: not at all, in prevalence, in size, in patient
mix (one attribute), in scanner appearance, or as given by a site column of the records."""

ATTRIBUTES = {"ViewPosition": "ViewPosition", "PatientSex": "PatientSex", "age-band": "age_band"}
"""``attribute`` setup choices mapped to the records column each one reads."""

SIZE_DISTRIBUTIONS = ("dirichlet", "power")
SPLITS = ("train", "val", "test")
HOLDOUT_SPLIT = "holdout"
HOLDOUT_SITE = -1
"""Site id of the rows of the global held-out test set, which belong to no site."""

DEFAULT_MIN_SITE_SIZE = 20
"""Images a site needs at least: with the default 70/15/15 split that leaves about 3
validation and 3 test images, below which per-site metrics are noise."""

DEFAULT_EXPECTED_BATCH_SIZE = 8
"""Same default as the run configuration's ``batch-size``."""

SPLIT_RATIO_TOLERANCE = 1e-6
"""How far the train/val/test ratios may sum from 1 (they come from decimal text)."""


@dataclass(frozen=True)
class SiteSettings:
    """Everything that determines a partition; the same settings give the same manifest.

    Attributes:
        setup: one of :data:`SETUPS`.
        num_sites: number of sites ``K``; ``None`` only for ``column``, which takes ``K``
            from the data (when given for ``column`` it must match).
        seed: non-negative seed of every random draw.
        alpha: Dirichlet concentration: for ``label-skew`` of each class over the sites,
            for ``quantity-skew`` (``size_distribution='dirichlet'``) of the site shares.
            Larger is more even; ``alpha -> inf`` approaches equal proportions.
        min_site_size: images a site must have at least (all its splits together).
        attribute: key of :data:`ATTRIBUTES`; required by ``attribute`` only.
        purity: share of a site's images that carry its dominant attribute value, in
            ``(0.5, 1]`` so that the dominant value is a strict majority.
        size_distribution: ``dirichlet`` or ``power`` for ``quantity-skew``.
        power_exponent: exponent ``a`` of the ``power`` size shares ``(rank + 1) ** -a``.
        site_column: records column that names the site; required by ``column`` only.
        split_ratios: ``(train, val, test)`` shares of each site's patients; each ``>= 0``,
            train ``> 0``, summing to 1.
        holdout_fraction: share of all patients set aside as a global test set, in ``[0, 1)``.
        expected_batch_size: expected Poisson batch ``B`` of DP-SGD at a site (images),
            used only for the guard-rail warnings and the summary's ``sample_rate``.
        style_strength: strength of the ``scanner-shift`` styles (0 gives neutral styles).
    """

    setup: str
    num_sites: int | None = None
    seed: int = 0
    alpha: float = 0.5
    min_site_size: int = DEFAULT_MIN_SITE_SIZE
    attribute: str | None = None
    purity: float = 0.8
    size_distribution: str = "dirichlet"
    power_exponent: float = 1.0
    site_column: str | None = None
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    holdout_fraction: float = 0.0
    expected_batch_size: int = DEFAULT_EXPECTED_BATCH_SIZE
    style_strength: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("setup", self.setup, SETUPS)
        _check_choice("size-distribution", self.size_distribution, SIZE_DISTRIBUTIONS)
        # numpy numbers become int and float, so the settings serialise to JSON.
        for field_name, key, low in _INTEGER_FIELDS:
            value = getattr(self, field_name)
            if value is not None or field_name != "num_sites":
                _check_integer(key, value, low=low)
                object.__setattr__(self, field_name, int(value))
        for field_name, key in _FLOAT_FIELDS:
            _check_finite(key, getattr(self, field_name))
            object.__setattr__(self, field_name, float(getattr(self, field_name)))
        _check_range("alpha", self.alpha, low=0.0, low_open=True)
        _check_range("purity", self.purity, low=0.5, high=1.0, low_open=True)
        _check_range("power-exponent", self.power_exponent, low=0.0, low_open=True)
        _check_range("holdout", self.holdout_fraction, low=0.0, high=1.0, high_open=True)
        _check_range("style-strength", self.style_strength, low=0.0)
        self._check_sites()
        self._check_setup_options()
        object.__setattr__(self, "split_ratios", _checked_ratios(self.split_ratios))

    def _check_sites(self) -> None:
        if self.num_sites is None and self.setup != "column":
            raise ValueError(f"setup {self.setup!r} needs the number of sites (--sites)")

    def _check_setup_options(self) -> None:
        if self.setup == "attribute":
            if self.attribute is None:
                raise ValueError(
                    f"setup 'attribute' needs --attribute, one of {', '.join(ATTRIBUTES)}"
                )
            _check_choice("attribute", self.attribute, tuple(ATTRIBUTES))
        if self.setup == "column" and not self.site_column:
            raise ValueError("setup 'column' needs --site-column, the records column naming the site")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain JSON values (the manifest sidecar stores them)."""
        values = dataclasses.asdict(self)
        values["split_ratios"] = list(self.split_ratios)
        return values


_INTEGER_FIELDS = (
    ("num_sites", "sites", 1),
    ("seed", "seed", 0),
    ("min_site_size", "min-site-size", 1),
    ("expected_batch_size", "batch-size", 1),
)
"""(field, option name in messages, lowest valid value) of the integer settings."""

_FLOAT_FIELDS = (
    ("alpha", "alpha"),
    ("purity", "purity"),
    ("power_exponent", "power-exponent"),
    ("holdout_fraction", "holdout"),
    ("style_strength", "style-strength"),
)


def _check_integer(key: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be an integer; got {value!r}")
    _check_range(key, value, low=low)


def _check_finite(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number; got {value!r}")


def _checked_ratios(ratios: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        raise ValueError(
            f"split ratios must be 3 numbers (train, val, test); got {ratios!r}"
        ) from None
    if len(values) != len(SPLITS):
        raise ValueError(f"split ratios must be 3 numbers (train, val, test); got {ratios!r}")
    if any(not math.isfinite(r) or r < 0 for r in values) or values[0] <= 0:
        raise ValueError(
            f"split ratios must be finite and >= 0 with a positive train share; got {ratios!r}"
        )
    if abs(sum(values) - 1.0) > SPLIT_RATIO_TOLERANCE:
        raise ValueError(f"split ratios must sum to 1; got {ratios!r} (sum {sum(values):.6g})")
    return values  # type: ignore[return-value]
