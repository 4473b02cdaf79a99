"""``dpfedseg privacy``: epsilon from each accountant, or a calibrated noise multiplier."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "privacy", help="compute epsilon (RDP, PRV, PLD) or calibrate the noise multiplier"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
