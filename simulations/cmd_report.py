"""``dpfedseg report``: rebuild every plot and table from saved results."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="rebuild plots and tables from a results folder",
        description=(
            "Read every finished run under OUT (the folder `dpfedseg compare --out` wrote) and "
            "rewrite OUT/comparison/: the figures, summary.csv and summary.md with the claims. "
            "Unfinished runs are left out and named in a warning."
        ),
    )
    parser.add_argument(
        "out", nargs="?", default="outputs", type=Path,
        help="outputs folder of a comparison (default: outputs)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simulations.compare import write_report

    if not args.out.is_dir():
        raise FileNotFoundError(
            f"results folder {args.out} not found; pass the --out folder of `dpfedseg compare`"
        )
    print_report(write_report(args.out))
    return 0


def print_report(written: list[Path]) -> None:
    """Print the summary table and claims of ``summary.md``, then every file written."""
    from simulations.summary import SUMMARY_MD

    for path in written:
        if path.name == SUMMARY_MD:
            text = path.read_text(encoding="utf-8")
            print(text.split("## Figures")[0].rstrip() + "\n")
    print("files written:")
    for path in written:
        print(f"  {path}")
