"""``dpfedseg compare``: RS vs automatic clipping across multi-center setups."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="run the method x setup x seed comparison through Flower's simulation"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
