"""Exact integer allocation: largest remainder, interleaving and stratified dealing."""

import numpy as np
import pytest

from common.sites.allocation import deal, interleave, largest_remainder, stream_rng


@pytest.mark.parametrize(
    "shares, total, expected",
    [
        ([0.7, 0.15, 0.15], 20, [14, 3, 3]),
        ([0.7, 0.15, 0.15], 3, [2, 1, 0]),  # quotas 2.1, 0.45, 0.45: tie to the lower index
        ([1, 1, 1], 10, [4, 3, 3]),
        ([0.5, 0.5], 0, [0, 0]),
        ([3, 0, 1], 8, [6, 0, 2]),
    ],
)
def test_largest_remainder_exact_values(shares, total, expected):
    assert largest_remainder(shares, total).tolist() == expected


@pytest.mark.parametrize("shares, total", [([0, 0], 5), ([1, -1], 5), ([1, np.nan], 5), ([1], -1), ([], 3)])
def test_largest_remainder_rejects_bad_input(shares, total):
    with pytest.raises(ValueError, match="must be"):
        largest_remainder(shares, total)


def test_interleave_has_exact_counts_and_even_prefixes():
    counts = np.array([14, 3, 3])
    sequence = interleave(counts)
    assert np.bincount(sequence).tolist() == counts.tolist()
    # Every prefix contains each group's proportional share within 1.5 copies.
    for length in range(1, counts.sum() + 1):
        prefix_counts = np.bincount(sequence[:length], minlength=3)
        assert np.all(np.abs(prefix_counts - length * counts / counts.sum()) <= 1.5), (length, prefix_counts)


def test_deal_is_stratified_and_exact():
    strata = np.array([1] * 30 + [0] * 170)
    groups = deal(strata, [140, 30, 30], np.random.default_rng(0))
    assert np.bincount(groups).tolist() == [140, 30, 30]
    positives = np.bincount(groups[strata == 1], minlength=3)
    # 30 positives over shares 0.7/0.15/0.15 give 21/4.5/4.5: within one patient.
    assert np.all(np.abs(positives - np.array([21, 4.5, 4.5])) <= 1.0), positives


def test_deal_gives_rare_stratum_to_small_group_first():
    # Three positives among many negatives: the validation group (15%) still gets one.
    strata = np.array([1, 1, 1] + [0] * 17)
    groups = deal(strata, [14, 3, 3], np.random.default_rng(5))
    assert np.bincount(groups[strata == 1], minlength=3).tolist() == [2, 1, 0]


def test_deal_rejects_count_mismatch():
    with pytest.raises(ValueError, match="counts sum to 5 but there are 4 units"):
        deal(np.zeros(4), [2, 3], np.random.default_rng(0))


def test_stream_rng_is_independent_per_stream_and_key():
    first = stream_rng(3, "splits", 0).random(4)
    assert np.array_equal(first, stream_rng(3, "splits", 0).random(4))
    assert not np.array_equal(first, stream_rng(3, "splits", 1).random(4))
    assert not np.array_equal(first, stream_rng(3, "styles", 0).random(4))
