"""The ``dpfedseg`` command: one entry point for data, sites, privacy, runs and reports.

Each subcommand lives in its own ``simulations/cmd_<name>.py`` module exposing
``register(subparsers)``; heavy imports (torch, Flower) happen inside the command, so
``dpfedseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.runtime import configure_environment, setup_logging

# Order is the order shown by ``dpfedseg --help``.
SUBCOMMAND_MODULES = (
    "simulations.cmd_data",
    "simulations.cmd_sites",
    "simulations.cmd_privacy",
    "simulations.cmd_compare",
    "simulations.cmd_report",
    "simulations.cmd_deploy",
)

log = logging.getLogger("dpfedseg")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dpfedseg",
        description=(
            "Federated, differentially private pneumonia segmentation on chest X-rays: "
            "data, site partitions, privacy accounting, and the RS vs automatic clipping "
            "comparison."
        ),
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING (default INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dpfedseg`` and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    setup_logging(args.log_level.upper())
    configure_environment()
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # User-facing failures carry a message that names the value and the fix.
        log.error("%s", error)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
