"""Patient-level splits: the global held-out test set and each site's train/val/test.

Splits are drawn per patient, so all images of a patient share one split. They are
stratified by label, so every split keeps about its site's positive rate.
"""

from __future__ import annotations

import numpy as np

from common.sites.allocation import deal, largest_remainder, stream_rng
from common.sites.settings import SPLITS


def holdout_mask(labels: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Return which patients form the global held-out test set.

    ``round(fraction * n)`` patients (largest remainder), stratified by label, drawn before
    any site is formed, so the held-out set has the positive rate of the whole data.
    """
    labels = np.asarray(labels)
    if fraction == 0 or labels.size == 0:
        return np.zeros(labels.size, dtype=bool)
    counts = largest_remainder([1.0 - fraction, fraction], labels.size)
    return deal(labels, counts, stream_rng(seed, "holdout")) == 1


def split_site(labels: np.ndarray, *, ratios: tuple[float, float, float], seed: int, site: int) -> np.ndarray:
    """Return the split (``train``, ``val`` or ``test``) of every patient of one site.

    The split sizes are ``ratios * n`` rounded by the largest remainder method; the
    patients are drawn stratified by label from the stream of ``(seed, site)``.
    """
    labels = np.asarray(labels)
    counts = largest_remainder(ratios, labels.size)
    groups = deal(labels, counts, stream_rng(seed, "splits", site))
    return np.asarray(SPLITS, dtype=object)[groups]
