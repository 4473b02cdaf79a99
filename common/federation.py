"""The message contract between a site's ClientApp and the ServerApp.

Both sides import these names; neither imports the other. A train reply carries the
updated weights (``arrays``), numbers (``metrics``, a Flower MetricRecord of ints,
floats and their lists) and text (``info``, a ConfigRecord). Nothing else leaves a site:
no images, masks or per-example values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "info"

SPARSE_VALUES = "rs-kept-values"  # a sparse RS upload: the kept coordinates' values
SPARSE_MASK_DIGEST = "rs-mask-digest"  # and the digest of the mask the site used

NUM_EXAMPLES = "num-examples"  # FedAvg's weight key; Flower's default name
SITE = "site"

# Ledger entries travel as parallel lists: one value per entry.
LEDGER_NOISE = "ledger-noise-multiplier"
LEDGER_RATE = "ledger-sample-rate"
LEDGER_STEPS = "ledger-steps"
LEDGER_ROUND = "ledger-server-round"  # -1 for entries without a round (central training)

TRAIN_METRIC_KEYS = (
    "train_loss",
    "steps",
    "noise_multiplier",
    "sample_rate",
    "epsilon",
    "delta",
    "train_seconds",
    "upload_bytes",
    "round_entries",  # how many trailing ledger entries belong to this round
)
EVAL_METRIC_KEYS = (
    "val_dice",
    "val_dice_positive",
    "val_iou",
    "val_fpr",
    "test_dice",
    "test_dice_positive",
    "test_iou",
    "test_fpr",
)

INFO_STATUS = "status"  # ok | refused
INFO_REASON = "reason"
INFO_ACCOUNTANT = "accountant"
INFO_METHOD = "method"
INFO_UPLOAD = "upload"  # dense | sparse
UPLOAD_DENSE = "dense"
UPLOAD_SPARSE = "sparse"


@dataclass(frozen=True)
class WireEntry:
    """One privacy-ledger entry as it travels: (sigma, q, steps, round)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    server_round: int | None


def pack_ledger(entries: Sequence[Any]) -> dict[str, list]:
    """Return MetricRecord lists for ledger entries (objects with the four fields)."""
    return {
        LEDGER_NOISE: [float(e.noise_multiplier) for e in entries],
        LEDGER_RATE: [float(e.sample_rate) for e in entries],
        LEDGER_STEPS: [int(e.steps) for e in entries],
        LEDGER_ROUND: [-1 if e.server_round is None else int(e.server_round) for e in entries],
    }


def unpack_ledger(metrics: Mapping[str, Any]) -> list[WireEntry]:
    """Rebuild the ledger entries a site sent; raise ValueError on inconsistent lists."""
    columns = [list(metrics.get(key, [])) for key in (LEDGER_NOISE, LEDGER_RATE, LEDGER_STEPS, LEDGER_ROUND)]
    lengths = {len(column) for column in columns}
    if len(lengths) != 1:
        raise ValueError(
            f"ledger lists in a reply have different lengths {sorted(lengths)}; "
            "the site and server run different versions of dpfedseg"
        )
    return [
        WireEntry(
            noise_multiplier=float(sigma),
            sample_rate=float(rate),
            steps=int(steps),
            server_round=None if int(rnd) < 0 else int(rnd),
        )
        for sigma, rate, steps, rnd in zip(*columns)
    ]
