"""``dpfedseg data``: synthetic RSNA-style data and dataset inspection.

    dpfedseg data synth OUT --images N --seed S [--size PX] [--sites K [--site-styles]]
    dpfedseg data inspect DIR [--json] [--no-decode]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.config import _check_range

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data synth`` and ``data inspect`` to the ``dpfedseg`` parser."""
    parser = subparsers.add_parser(
        "data", help="generate synthetic RSNA-style data or inspect a dataset folder"
    )
    parser.set_defaults(func=lambda args: parser.print_help())
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION")
    _register_synth(commands)
    _register_inspect(commands)


def _register_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth",
        help="write a synthetic dataset in the RSNA layout (JPEG DICOMs + labels CSVs)",
        description=(
            "Write synthetic chest radiographs in the RSNA Pneumonia Detection layout. Headers "
            "and boxes follow the real RSNA statistics; the same seed gives identical files."
        ),
    )
    synth.add_argument("out", type=Path, help="output folder (created; must be new or empty)")
    synth.add_argument("--images", type=int, required=True, help="number of images (patients)")
    synth.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    synth.add_argument(
        "--size", type=int, default=1024, help="image side in pixels (default 1024, as RSNA)"
    )
    synth.add_argument(
        "--sites", type=int, default=0,
        help="number of sites; image i belongs to site i %% K (written to synth_sites.csv)",
    )
    synth.add_argument(
        "--site-styles", action="store_true",
        help="give each site a random scanner style (contrast, gamma, noise, blur, and "
        "magnification of its AP films); needs --sites",
    )
    synth.add_argument(
        "--positive-rate", type=float, default=None,
        help="share of positive images (default: the real RSNA rate per view and sex, ~22.5%%)",
    )
    synth.set_defaults(func=_run_synth)


def _register_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="count images, positives, boxes, classes, view/sex/age mix and problems",
        description=(
            "Read a dataset folder (RSNA or images/masks layout) and report its contents and "
            "every skipped or repaired item, without stopping on failures."
        ),
    )
    inspect.add_argument("dir", type=Path, help="dataset folder")
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.add_argument(
        "--no-decode", action="store_true",
        help="read headers only (faster; decode failures are then not checked)",
    )
    inspect.add_argument(
        "--max-failure-fraction", type=float, default=0.1,
        help="share of failed images or label rows above which training refuses the folder "
        "(default 0.1); the report says whether the folder passes",
    )
    inspect.set_defaults(func=_run_inspect)


def _run_synth(args: argparse.Namespace) -> int:
    from common.data.synth import random_site_styles, synthesize

    _check_synth_arguments(args)
    styles = random_site_styles(args.sites, seed=args.seed) if args.site_styles else None
    if args.sites and not args.site_styles:
        from common.style import AcquisitionStyle

        styles = [AcquisitionStyle()] * args.sites
    summary = synthesize(
        args.out,
        images=args.images,
        seed=args.seed,
        image_size=args.size,
        site_styles=styles,
        positive_rate=args.positive_rate,
    )
    print(
        f"wrote {_count(summary.images, 'image')} ({summary.positives} positive, "
        f"{_count(summary.boxes, 'box', 'boxes')}, {summary.image_size} px) to "
        f"{summary.out_dir} in {summary.seconds:.1f} s "
        f"({summary.seconds_per_image * 1000:.0f} ms/image)"
    )
    return 0


def _count(number: int, singular: str, plural: str | None = None) -> str:
    """Return ``number`` with the noun in singular or plural: "1 image", "2 images"."""
    noun = singular if number == 1 else plural or f"{singular}s"
    return f"{number} {noun}"


def _check_synth_arguments(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag, because ``synthesize`` names its parameters."""
    from common.data.synth import MIN_IMAGE_SIZE

    for flag, value, low in (
        ("--images", args.images, 1),
        ("--seed", args.seed, 0),
        ("--size", args.size, MIN_IMAGE_SIZE),
        ("--sites", args.sites, 0),
    ):
        _check_range(flag, value, low=low)
    if args.positive_rate is not None:
        _check_range("--positive-rate", args.positive_rate, low=0.0, high=1.0)
    if args.site_styles and args.sites < 1:
        raise ValueError("--site-styles needs --sites K with K >= 1")


def _run_inspect(args: argparse.Namespace) -> int:
    from common.data.load import scan_dataset
    from common.data.rsna import IMAGES_DIR, LABELS_FILE
    from common.data.summary import format_summary, summarize

    _check_range("--max-failure-fraction", args.max_failure_fraction, low=0.0, high=1.0)
    labels_only = (args.dir / LABELS_FILE).is_file() and not (args.dir / IMAGES_DIR).is_dir()
    if labels_only:
        log.warning("%s has no %s folder: inspecting the label files only", args.dir, IMAGES_DIR)
    loaded = scan_dataset(
        args.dir, decode=not args.no_decode and not labels_only, require_images=not labels_only
    )
    loaded.report.log_suppressed()
    summary = summarize(
        loaded, max_failure_fraction=args.max_failure_fraction, labels_only=labels_only
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0
