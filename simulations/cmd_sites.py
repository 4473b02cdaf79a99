"""``dpfedseg sites``: split a dataset into simulated hospital sites."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sites", help="partition a dataset into sites with train/val/test splits (manifest CSV)"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
