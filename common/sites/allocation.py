"""Integer allocation helpers shared by every site setup and by the splits.

All allocations are exact: the counts handed out always sum to the number of units, so
every patient lands in exactly one group and none is dropped or duplicated.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def largest_remainder(shares: ArrayLike, total: int) -> np.ndarray:
    """Round ``total * shares / sum(shares)`` to non-negative integers summing to ``total``.

    Hamilton's largest-remainder method: every quota is floored, and the units still
    missing go one each to the largest fractional parts (ties to the lower index).

    Raises:
        ValueError: when ``total`` is negative or ``shares`` has a negative, non-finite
            or all-zero entry set.
    """
    quotas = np.asarray(shares, dtype=float)
    if total < 0:
        raise ValueError(f"total must be >= 0; got {total}")
    if quotas.ndim != 1 or quotas.size == 0:
        raise ValueError(f"shares must be a non-empty 1-D sequence; got shape {quotas.shape}")
    if not np.all(np.isfinite(quotas)) or np.any(quotas < 0) or quotas.sum() <= 0:
        raise ValueError(f"shares must be finite, >= 0 and not all 0; got {quotas.tolist()}")
    quotas = total * quotas / quotas.sum()
    counts = np.floor(quotas).astype(np.int64)
    missing = int(total - counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:missing]] += 1
    return counts


def interleave(counts: ArrayLike) -> np.ndarray:
    """Return a sequence with ``counts[j]`` copies of group ``j``, each group spread evenly.

    Copy ``t`` of group ``j`` gets the key ``(t + 0.5) / counts[j]`` and the sequence is the
    groups sorted by key (ties to the lower group). A contiguous run of length ``L`` thus
    contains about ``L * counts[j] / sum(counts)`` copies of group ``j``, which is what makes
    :func:`deal` stratified.
    """
    sizes = np.asarray(counts, dtype=np.int64)
    if sizes.ndim != 1 or np.any(sizes < 0):
        raise ValueError(f"counts must be a 1-D sequence of integers >= 0; got {sizes.tolist()}")
    groups = np.repeat(np.arange(sizes.size), sizes)
    ranks = np.concatenate([np.arange(size) for size in sizes]) if sizes.size else groups
    keys = (ranks + 0.5) / np.repeat(np.maximum(sizes, 1), sizes)
    return groups[np.lexsort((groups, keys))]


def deal(strata: ArrayLike, counts: ArrayLike, rng: np.random.Generator) -> np.ndarray:
    """Assign each unit to a group of exactly ``counts[j]`` units, stratified by ``strata``.

    The units are shuffled, sorted by stratum (the rarest stratum first) and handed out
    along :func:`interleave`, so every group receives about its share ``counts[j] / n`` of
    every stratum and the units inside a stratum are chosen at random. The rarest stratum
    goes first so that a small group (a validation split) gets its first rare unit
    (a positive patient) as early as possible.

    Returns:
        An int array of group indices, one per unit, in the order of ``strata``.
    """
    labels = np.asarray(strata)
    sizes = np.asarray(counts, dtype=np.int64)
    if int(sizes.sum()) != labels.size:
        raise ValueError(f"counts sum to {int(sizes.sum())} but there are {labels.size} units")
    _, codes, frequencies = np.unique(labels, return_inverse=True, return_counts=True)
    rarity_rank = np.argsort(np.argsort(frequencies, kind="stable"), kind="stable")
    shuffled = rng.permutation(labels.size)
    order = shuffled[np.argsort(rarity_rank[codes.ravel()][shuffled], kind="stable")]
    groups = np.empty(labels.size, dtype=np.int64)
    groups[order] = interleave(sizes)
    return groups


RANDOM_STREAMS = {"holdout": 1, "sites": 2, "splits": 3, "styles": 4}
"""One independent random stream per decision, so that, for example, a site's split
depends only on the seed, the site and its patients, not on how many draws came before."""


def stream_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """Return the generator of ``stream`` (a key of :data:`RANDOM_STREAMS`) for ``seed``.

    ``keys`` (for example a site id) select a sub-stream; they must be >= 0.
    """
    return np.random.default_rng([seed, RANDOM_STREAMS[stream], *keys])
