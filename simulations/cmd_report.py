"""``dpfedseg report``: rebuild every plot and table from saved results."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="rebuild plots and tables from a results folder")
    parser.set_defaults(func=lambda args: parser.print_help())
