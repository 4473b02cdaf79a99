"""Differential privacy of DP-SGD: accountants, noise calibration and per-site ledgers."""

from common.privacy.accounting import (
    ACCOUNTANT_LABELS,
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_table,
    federation_epsilon,
)
from common.privacy.ledger import LedgerEntry, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_LABELS",
    "LedgerEntry",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "epsilon_table",
    "federation_epsilon",
]
