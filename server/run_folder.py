"""The run folder the server owns: config, per-round rows, checkpoints, ledgers, status.

Every file is written atomically, so a run killed at any moment leaves the previous
complete version of each file. The layout is described in :mod:`common.results`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from common import atomic
from common.config import RunConfig
from common.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FINAL_MODEL_FILE,
    LEDGER_DIR,
    ROUND_COLUMNS,
    ROUNDS_FILE,
    STATUS_FILE,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class RunFolder:
    """Reader and writer of one run's output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: RunConfig) -> None:
        """Write the resolved configuration (``config.json``)."""
        atomic.write_json(self.path / CONFIG_FILE, config.to_run_config())

    def read_rows(self) -> pd.DataFrame:
        """Return ``rounds.csv`` (empty frame with the schema's columns when missing)."""
        file = self.path / ROUNDS_FILE
        if not file.exists():
            return pd.DataFrame(columns=list(ROUND_COLUMNS))
        return pd.read_csv(file, keep_default_na=False, na_values=[""])

    def write_rows(self, rows: pd.DataFrame) -> None:
        """Replace ``rounds.csv`` with ``rows`` in schema column order."""
        missing = [c for c in ROUND_COLUMNS if c not in rows.columns]
        for column in missing:
            rows[column] = np.nan
        atomic.write_csv(self.path / ROUNDS_FILE, rows[list(ROUND_COLUMNS)])

    def append_rows(self, new_rows: list[Mapping[str, Any]]) -> None:
        """Append one round's rows to ``rounds.csv`` (rewritten atomically)."""
        rows = self.read_rows()
        frame = pd.DataFrame(new_rows)
        rows = frame if rows.empty else pd.concat([rows, frame], ignore_index=True)
        self.write_rows(rows)

    def truncate_rows(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (work lost with an interrupted round)."""
        rows = self.read_rows()
        if not rows.empty:
            self.write_rows(rows[rows["server_round"] <= last_round].reset_index(drop=True))

    def save_checkpoint(
        self,
        *,
        server_round: int,
        weights: Mapping[str, np.ndarray],
        tracker_state: dict[str, Any],
        node_sites: Mapping[int, int],
    ) -> None:
        """Write the state needed to resume at ``server_round + 1``."""
        import torch

        state = {
            "format": CHECKPOINT_FORMAT,
            "server_round": server_round,
            "weights": {k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
            "tracker": json.dumps(tracker_state),
            "node_sites": {int(k): int(v) for k, v in node_sites.items()},
        }
        atomic.save_torch(self.path / CHECKPOINT_FILE, state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Return the last checkpoint, or None when the folder has none."""
        import torch

        file = self.path / CHECKPOINT_FILE
        if not file.exists():
            return None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(
                f"checkpoint {file} cannot be read ({error}); delete it to start over"
            ) from error
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {file} has format {state.get('format')}, expected 1")
        state["weights"] = {k: v.numpy() for k, v in state["weights"].items()}
        state["tracker"] = json.loads(state["tracker"])
        return state

    def write_ledgers(self, tracker_state: dict[str, Any]) -> None:
        """Write the ledger entries the server received, one file per site."""
        for site, value in tracker_state["sites"].items():
            record = {
                "site": int(site),
                "delta": tracker_state["delta"],
                "accountant": tracker_state["accountant"],
                "epsilon": value["epsilon_server"],
                "entries": value["entries"],
            }
            atomic.write_json(self.path / LEDGER_DIR / f"site-{site}.json", record)

    def write_final_model(self, weights: Mapping[str, np.ndarray]) -> None:
        """Write the final global weights as a plain U-Net state dict."""
        import torch

        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        atomic.save_torch(self.path / FINAL_MODEL_FILE, state)

    def write_status(self, *, complete: bool, last_round: int, stop_reason: str) -> None:
        """Write ``status.json``."""
        atomic.write_json(
            self.path / STATUS_FILE,
            {"complete": complete, "last_round": last_round, "stop_reason": stop_reason},
        )

    def read_status(self) -> dict[str, Any] | None:
        """Return ``status.json`` or None."""
        file = self.path / STATUS_FILE
        return json.loads(file.read_text()) if file.exists() else None
