"""``dpfedseg deploy``: run the Flower apps as real SuperLink/SuperNode processes on loopback."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy", help="run one SuperLink and K SuperNodes on 127.0.0.1 (optionally with TLS)"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
