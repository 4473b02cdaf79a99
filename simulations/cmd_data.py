"""``dpfedseg data``: synthetic RSNA-style data and dataset inspection."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="generate synthetic RSNA-style data or inspect a dataset folder"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
