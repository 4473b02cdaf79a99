"""Flower ServerApp: parse the run config once, build the initial U-Net, run the rounds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.model import build_unet, load_init_weights, plain_state_dict
from common.runtime import setup_logging
from server.federation import run_federation
from server.run_folder import RunFolder

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated training job as configured in ``[tool.flwr.app.config]``."""
    setup_logging()
    config = RunConfig.from_run_config(context.run_config)
    output_dir = Path(config.output_dir).resolve()
    log.info("run config: %s", config.to_run_config())
    log.info("writing results to %s", output_dir)
    run_federation(
        grid,
        config,
        initial_weights=initial_weights(config),
        folder=RunFolder(output_dir),
    )


def initial_weights(config: RunConfig) -> dict:
    """Return the round-1 global weights: seeded random init, or ``init-weights`` when set."""
    torch.manual_seed(config.seed)
    model = build_unet(encoder=config.encoder, group_norm_groups=config.group_norm_groups)
    if config.init_weights:
        load_init_weights(model, config.init_weights)
    return {k: v.detach().cpu().numpy() for k, v in plain_state_dict(model).items()}
