"""Names of the files and columns a federated run writes, shared by server and reports.

One run folder (``output-dir``) holds:

- ``config.json``: the resolved :class:`common.config.RunConfig` plus the number of sites.
- ``rounds.csv``: one row per (server_round, site) with :data:`ROUND_COLUMNS`.
- ``checkpoint.pt``: model weights and server state after the last finished round.
- ``ledgers/site-<site>.json``: the privacy ledger entries the server received per site.
- ``final_model.pt``: the final global weights (plain U-Net state-dict keys).
- ``status.json``: ``{"complete": bool, "last_round": int, "stop_reason": str}``.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
ROUNDS_FILE = "rounds.csv"
CHECKPOINT_FILE = "checkpoint.pt"
LEDGER_DIR = "ledgers"
FINAL_MODEL_FILE = "final_model.pt"
STATUS_FILE = "status.json"

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_REFUSED = "refused"
STATUS_NOT_SAMPLED = "not-sampled"

ROUND_COLUMNS = (
    "server_round",  # 1-based Flower round
    "site",  # site id (partition id in simulation, node-config site in deployment)
    "status",  # ok | failed | refused | not-sampled
    "reason",  # error text or refusal reason, empty when ok
    "method",
    "num_examples",  # training examples of the site (its shard size)
    "train_loss",
    "steps",  # DP-SGD steps taken this round
    "noise_multiplier",
    "sample_rate",
    "epsilon",  # cumulative epsilon reported by the site
    "epsilon_server",  # cumulative epsilon the server recomputed from the ledger entries
    "accountant",  # rdp | prv | pld
    "delta",
    "upload_bytes",  # bytes of the model update the site sent
    "train_seconds",  # local training wall time at the site
    "round_seconds",  # server wall time of the whole round
    "val_dice",  # Dice over all validation images, empty-mask convention in common.metrics
    "val_dice_positive",  # Dice over validation images with at least one box
    "val_iou",
    "val_fpr",  # share of negative validation images with any predicted pixel
    "test_dice",
    "test_dice_positive",
    "test_iou",
    "test_fpr",
)
