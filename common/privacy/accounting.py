"""Epsilon of DP-SGD with Poisson sampling from three accountants, and noise calibration.

Each DP-SGD step is the sampled Gaussian mechanism (SGM). Every example of the site's shard
enters the batch independently with probability ``q`` (``sample_rate``, Poisson sampling).
The clipped per-sample gradients (L2 sensitivity ``C``) are summed, and ``N(0, sigma^2 C^2 I)``
is added, ``sigma`` being the ``noise_multiplier``. Neighbouring datasets differ by adding or
removing one example, and ``T`` steps compose adaptively.

Accountants, all returning an (epsilon, delta) upper bound for the whole composition:

- ``rdp``: Renyi DP (Mironov, "Renyi Differential Privacy", CSF 2017, arXiv 1702.07476).
  Opacus' ``RDPAccountant`` computes the SGM's RDP at each order ``alpha`` (Mironov,
  Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019,
  arXiv 1908.10530, Section 3.3), RDP adds up over steps, and the conversion to
  (epsilon, delta) is ``eps = min_alpha rdp(alpha) - (log delta + log alpha) / (alpha - 1)
  + log((alpha - 1) / alpha)`` (Balle et al., AISTATS 2020, arXiv 1905.09982, Theorem 21).
  Conservative, fast, and the default. At fractional orders Opacus 1.6 sums the exact
  signed series, while ``dp_accounting`` 0.6 sums absolute values (a looser bound), so the
  two can differ slightly; the tests check this one against numerical integration.
- ``prv``: privacy loss random variables composed numerically by FFT (Gopi, Lee,
  Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021,
  arXiv 2106.02848), via Opacus' ``PRVAccountant``. It returns the upper end of its
  error interval (estimate plus ``PRV_EPS_ERROR``), never the point estimate.
- ``pld``: privacy loss distributions of Google's ``dp_accounting`` (``PLDAccountant``
  with pessimistic discretisation, add-or-remove neighbours). Tight up to the
  discretisation interval, and the slowest of the three.

Composition is commutative for all three, so entries with equal ``(sigma, q)`` are merged
into one entry with the summed steps before composing. Merging is exact, and it keeps the
cost independent of the number of rounds.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from common.config import ACCOUNTANTS, _check_range
from common.text import counted

if TYPE_CHECKING:
    from common.privacy.ledger import LedgerEntry

log = logging.getLogger(__name__)

__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_LABELS",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "epsilon_table",
    "federation_epsilon",
    "group_entries",
]

ACCOUNTANT_LABELS = {
    "rdp": "RDP (Opacus RDPAccountant)",
    "prv": "PRV (Opacus PRVAccountant, upper bound)",
    "pld": "PLD (dp_accounting PLDAccountant)",
}
"""Human-readable name of each accountant, shown next to every reported epsilon."""

RDP_ORDERS = tuple(
    [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)
"""RDP orders alpha searched for the best conversion: the grid of ``dp_accounting`` 0.6.

Opacus' own default grid lacks 11 and the orders above 63. Adding them only tightens the
bound (the minimum is over more orders), and large orders matter for small epsilon."""

PRV_EPS_ERROR = 0.01
"""Absolute error allowed in the PRV epsilon; the reported value is estimate + this error."""

PLD_DISCRETIZATION = 1e-4
"""Privacy-loss discretisation interval of the PLD accountant (``dp_accounting`` default)."""

# Search interval of calibrate_noise_multiplier. At sigma 0.05 one step already costs an RDP
# epsilon above 250 (delta 1e-5, any q >= 0.001). Above 1000 the RDP bound stops falling: its
# conversion term -(log delta + log alpha) / (alpha - 1) at the largest order is a floor.
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1000.0

# (noise_multiplier, sample_rate, steps), the history format of Opacus' accountants.
Composition = list[tuple[float, float, int]]


def check_delta(delta: float) -> None:
    """Raise ``ValueError`` unless ``0 < delta < 1``."""
    _check_range("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)


def check_accountant(accountant: str) -> None:
    """Raise ``ValueError`` unless ``accountant`` is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")


def group_entries(entries: Iterable["LedgerEntry"]) -> Composition:
    """Merge entries with equal ``(noise_multiplier, sample_rate)`` into one, summing steps.

    Entries with 0 steps are dropped. Groups keep the order of their first entry.
    """
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for entry in entries:
        if entry.steps > 0:
            key = (entry.noise_multiplier, entry.sample_rate)
            steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + entry.steps
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()]


def compute_epsilon(
    entries: Sequence["LedgerEntry"], *, delta: float, accountant: str = "rdp"
) -> float:
    """Return the epsilon of all ``entries`` composed, at ``delta``, from ``accountant``.

    An empty composition (no entries, or only entries with 0 steps) has epsilon 0.
    """
    check_delta(delta)
    check_accountant(accountant)
    return _epsilon(group_entries(entries), delta=delta, accountant=accountant)


def _epsilon(composition: Composition, *, delta: float, accountant: str) -> float:
    if not composition:
        return 0.0
    return _cached_epsilon(tuple(composition), delta, accountant)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(composition: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # A site needs the same composition's epsilon more than once a round: for the budget
    # check before training and for the ledger after it. One RDP evaluation took about
    # 0.25 s on 2 cores, so four of them were half of a 64 px demo round at a site.
    try:
        epsilon = float(_ACCOUNTANT_FUNCTIONS[accountant](composition, delta))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError) as error:
        # PRV's and PLD's grids grow with the steps and 1/sigma, and numpy's MemoryError
        # names the size requested (38 to 455 GiB at sigma 1e-3 or 1e8 steps).
        raise RuntimeError(
            f"the {accountant} accountant failed on (noise_multiplier, sample_rate, steps) "
            f"{list(composition)} at delta {delta:g}: {error}; use the rdp accountant for this case"
        ) from error
    if math.isnan(epsilon):
        raise RuntimeError(
            f"the {accountant} accountant returned NaN for (noise_multiplier, sample_rate, "
            f"steps) {list(composition)} at delta {delta:g}; use the rdp accountant for this case"
        )
    return max(epsilon, 0.0)


def _rdp_epsilon(composition: Composition, delta: float) -> float:
    # Opacus and dp_accounting import torch and scipy; load them only when needed.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(composition)
    return accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))


def _prv_epsilon(composition: Composition, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(composition)
    # Opacus 1.6 returns the upper end of the error interval here.
    return accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)


def _pld_epsilon(composition: Composition, delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma)),
            steps,
        )
        for sigma, sample_rate, steps in composition
    ]
    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return accountant.get_epsilon(delta)


_ACCOUNTANT_FUNCTIONS: dict[str, Callable[[Composition, float], float]] = {
    "rdp": _rdp_epsilon,
    "prv": _prv_epsilon,
    "pld": _pld_epsilon,
}


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence["LedgerEntry"] = (),
    tolerance: float = 0.01,
) -> float:
    """Return the smallest noise multiplier, to a relative ``tolerance``, that stays within budget.

    ``steps`` are all the DP-SGD steps still to run at ``sample_rate`` (for a site:
    rounds x local epochs x steps per epoch), composed after the ``prior`` entries already
    spent. The result ``sigma`` satisfies ``epsilon(sigma) <= target_epsilon``, checked
    by evaluating that epsilon, so it never overshoots. Because epsilon decreases as
    sigma grows, ``epsilon(sigma * (1 - tolerance)) > target_epsilon`` too, so sigma is at
    most ``tolerance`` larger than needed (for prv and pld up to their numerical noise,
    which can make epsilon non-monotone by about their error bound).

    The search brackets sigma by halving or doubling from 1, then bisects geometrically.

    Raises:
        ValueError: an argument is out of range, or the target is impossible. A target is
            impossible when even sigma :data:`MAX_NOISE_MULTIPLIER` exceeds it (too small
            for this accountant and delta, or already spent by the prior entries), or when
            even sigma :data:`MIN_NOISE_MULTIPLIER` meets it (so large it bounds nothing).
    """
    _check_range("target_epsilon", target_epsilon, low=0.0, low_open=True)
    check_delta(delta)
    check_accountant(accountant)
    _check_range("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    _check_range("steps", steps, low=1)
    _check_range("tolerance", tolerance, low=0.0, high=0.5, low_open=True, high_open=True)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    prior_composition = group_entries(prior)
    evaluated: dict[float, float] = {}

    def epsilon_at(sigma: float) -> float:
        if sigma not in evaluated:
            composition = _add_mechanism(prior_composition, (sigma, sample_rate, steps))
            evaluated[sigma] = _epsilon(composition, delta=delta, accountant=accountant)
        return evaluated[sigma]

    def within(sigma: float) -> bool:
        return epsilon_at(sigma) <= target_epsilon

    low, high = _bracket(within)
    if high > MAX_NOISE_MULTIPLIER:
        spent = ""
        if prior_composition:
            prior_epsilon = _epsilon(prior_composition, delta=delta, accountant=accountant)
            spent = f"; the prior entries alone spend {prior_epsilon:.4f}"
        raise ValueError(
            f"target_epsilon {target_epsilon:g} cannot be met with the {accountant} accountant "
            f"at delta {delta:g} for {steps} steps at sample_rate {sample_rate:g}: even "
            f"noise_multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon "
            f"{epsilon_at(MAX_NOISE_MULTIPLIER):.4f}{spent}; raise target_epsilon, plan fewer "
            "steps, or use a tighter accountant (prv or pld)"
        )
    if low < MIN_NOISE_MULTIPLIER:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} is met even with noise_multiplier "
            f"{MIN_NOISE_MULTIPLIER:g} ({accountant} accountant, delta {delta:g}, {steps} steps "
            f"at sample_rate {sample_rate:g}), so it bounds nothing useful; lower target_epsilon"
        )

    while low < high * (1.0 - tolerance):
        middle = math.sqrt(low * high)
        if within(middle):
            high = middle
        else:
            low = middle
    log.info(
        "calibrated noise_multiplier %.4f: epsilon %.4f <= target %g (%s accountant, delta %g, "
        "%s at sample_rate %g after %s)",
        high,
        epsilon_at(high),
        target_epsilon,
        accountant,
        delta,
        counted(steps, "step"),
        sample_rate,
        counted(len(prior), "prior entry", "prior entries"),
    )
    return high


def _bracket(within: Callable[[float], bool]) -> tuple[float, float]:
    """Return ``(low, high)`` with ``within(high)`` true and ``within(low)`` false.

    Only sigmas in [:data:`MIN_NOISE_MULTIPLIER`, :data:`MAX_NOISE_MULTIPLIER`] are
    evaluated. ``high`` is infinite when none of them is within budget, and ``low`` is 0
    when even the smallest is.
    """
    sigma = 1.0
    if within(sigma):
        while sigma > MIN_NOISE_MULTIPLIER:
            lower = max(sigma / 2, MIN_NOISE_MULTIPLIER)
            if not within(lower):
                return lower, sigma
            sigma = lower
        return 0.0, sigma
    while sigma < MAX_NOISE_MULTIPLIER:
        higher = min(sigma * 2, MAX_NOISE_MULTIPLIER)
        if within(higher):
            return sigma, higher
        sigma = higher
    return sigma, math.inf


def _add_mechanism(composition: Composition, mechanism: tuple[float, float, int]) -> Composition:
    """Return ``composition`` with ``mechanism`` added, merged into an equal ``(sigma, q)``."""
    sigma, sample_rate, steps = mechanism
    merged = list(composition)
    for index, (other_sigma, other_rate, other_steps) in enumerate(merged):
        if (other_sigma, other_rate) == (sigma, sample_rate):
            merged[index] = (sigma, sample_rate, other_steps + steps)
            return merged
    merged.append(mechanism)
    return merged


def epsilon_table(
    entries: Sequence["LedgerEntry"],
    *,
    delta: float,
    accountants: Sequence[str] = ACCOUNTANTS,
) -> list[dict[str, object]]:
    """Return one row per accountant: ``accountant``, ``label``, ``epsilon``, ``delta``, ``error``.

    An accountant that fails (PRV can run out of memory at a tiny noise multiplier) gets
    ``epsilon`` None and its reason in ``error``, and the other rows are still computed.
    """
    rows: list[dict[str, object]] = []
    for name in accountants:
        row: dict[str, object] = {
            "accountant": name, "label": ACCOUNTANT_LABELS[name], "epsilon": None, "delta": delta, "error": None,
        }
        try:
            row["epsilon"] = compute_epsilon(entries, delta=delta, accountant=name)
        except RuntimeError as error:
            row["error"] = str(error)
        rows.append(row)
    return rows


def federation_epsilon(
    site_entries: Mapping[str, Sequence["LedgerEntry"]],
    *,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Return the federation-wide epsilon: the maximum of the per-site epsilons at ``delta``.

    Each record lives at exactly one site and each site's DP-SGD touches only its own
    records, so the federation is as private as its least private site (parallel
    composition). Server-side sampling of sites is not counted as amplification. No sites: 0.
    """
    epsilons = [
        compute_epsilon(entries, delta=delta, accountant=accountant)
        for entries in site_entries.values()
    ]
    return max(epsilons, default=0.0)
