"""``dpfedseg sites``: split a dataset into simulated hospital sites.

Reads DATA (a dataset folder, an RSNA label folder without images, or a records CSV),
partitions it with :func:`common.sites.partition_records`, prints the per-site summary
and writes the manifest, its summary, its JSON sidecar and the partition plot.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

# Only the light settings module at import time: `dpfedseg --help` must not load pandas.
from common.sites.settings import ATTRIBUTES, HOLDOUT_SITE, HOLDOUT_SPLIT, SETUPS, SIZE_DISTRIBUTIONS, SiteSettings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

RSNA_IMAGES_DIR = "stage_2_train_images"

OPTION_SETUPS = {
    "alpha": ("label-skew", "quantity-skew"),
    "attribute": ("attribute",),
    "purity": ("attribute",),
    "size_distribution": ("quantity-skew",),
    "power_exponent": ("quantity-skew",),
    "site_column": ("column",),
    "style_strength": ("scanner-shift",),
}
"""Options that only some setups read; giving one to another setup is an error, so a
setting never looks applied when it is not."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sites",
        help="partition a dataset into sites with train/val/test splits (manifest CSV)",
        description=(
            "Split DATA into simulated hospital sites, each with patient-level train/val/test "
            "splits, and write MANIFEST.csv (one row per image), MANIFEST.summary.csv, "
            "MANIFEST.json (settings) and MANIFEST.png (plot)."
        ),
    )
    parser.add_argument(
        "data", metavar="DATA",
        help="dataset folder (RSNA layout or images/masks), RSNA label folder without images, "
        "or a records CSV (patient_id, target, optional ViewPosition, PatientSex, PatientAge, class_name)",
    )
    parser.add_argument("--setup", required=True, choices=SETUPS, help="how the sites differ")
    parser.add_argument("--sites", type=int, help="number of sites (column: taken from the data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--out", required=True, type=Path, metavar="MANIFEST.csv", help="manifest path")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    _add_setup_options(parser)
    _add_split_options(parser)
    parser.set_defaults(func=run_sites)


def _add_setup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha", type=float,
        help=f"Dirichlet concentration, label-skew and quantity-skew (default {_default('alpha')})",
    )
    parser.add_argument(
        "--min-site-size", type=int,
        help=f"minimum number of images per site (default {_default('min_site_size')})",
    )
    parser.add_argument("--attribute", choices=tuple(ATTRIBUTES), help="attribute that dominates each site")
    parser.add_argument(
        "--purity", type=float,
        help="share of a site's patients with its dominant attribute value, in (0.5, 1] "
        f"(default {_default('purity')})",
    )
    parser.add_argument(
        "--size-distribution", choices=SIZE_DISTRIBUTIONS,
        help=f"quantity-skew site sizes (default {_default('size_distribution')})",
    )
    parser.add_argument(
        "--power-exponent", type=float,
        help=f"exponent a of the power-law size shares (rank+1)^-a (default {_default('power_exponent')})",
    )
    parser.add_argument("--site-column", help="records column naming the site (column setup)")
    parser.add_argument(
        "--style-strength", type=float,
        help=f"scanner-shift style strength, 0 = neutral (default {_default('style_strength')})",
    )


def _add_split_options(parser: argparse.ArgumentParser) -> None:
    ratios = ",".join(f"{r:g}" for r in _default("split_ratios"))
    parser.add_argument("--split", metavar="RATIOS", help=f"train,val,test shares per site (default {ratios})")
    parser.add_argument(
        "--holdout", type=float, metavar="FRACTION",
        help=f"share of patients held out as a global test set (default {_default('holdout_fraction')})",
    )
    parser.add_argument(
        "--batch-size", type=int,
        help="expected Poisson batch size per site, used by the warnings and the summary's "
        f"sample_rate (default {_default('expected_batch_size')})",
    )


def _default(name: str):
    return SiteSettings.__dataclass_fields__[name].default


def run_sites(args: argparse.Namespace) -> int:
    """Partition DATA with the requested settings, print the summary and write the files."""
    from common.sites import partition_records, write_manifest

    settings = settings_from_args(args)
    if args.out.suffix.lower() != ".csv":
        raise ValueError(f"--out must be a .csv path; got {args.out}")
    frame, source = load_records(Path(args.data))
    partition = partition_records(frame, settings, source=source)
    print(format_summary(partition.summary))
    files = write_manifest(partition, args.out, source=str(args.data))
    log.info("wrote manifest %s, summary %s and settings %s", files.manifest, files.summary, files.sidecar)
    if not args.no_plot:
        from simulations.site_plots import save_partition_plot

        title = f"{settings.setup}, {partition.num_sites} sites, seed {settings.seed}"
        plot = save_partition_plot(partition.summary, args.out.with_suffix(".png"), title=title)
        log.info("wrote partition plot %s", plot)
    return 0


def settings_from_args(args: argparse.Namespace) -> SiteSettings:
    """Build the :class:`SiteSettings`, rejecting options the chosen setup would ignore."""
    explicit = {name: getattr(args, name) for name in OPTION_SETUPS if getattr(args, name) is not None}
    for name in explicit:
        if args.setup not in OPTION_SETUPS[name]:
            raise ValueError(
                f"--{name.replace('_', '-')} applies to --setup {' or '.join(OPTION_SETUPS[name])}, "
                f"not {args.setup}; remove it"
            )
    distribution = explicit.get("size_distribution", "dirichlet")
    if args.setup == "quantity-skew" and distribution == "power" and "alpha" in explicit:
        raise ValueError("--alpha applies to --size-distribution dirichlet, not power; remove it")
    if args.setup == "quantity-skew" and distribution == "dirichlet" and "power_exponent" in explicit:
        raise ValueError("--power-exponent applies to --size-distribution power; add it or remove --power-exponent")
    options = dict(explicit)
    optional = {
        "min_site_size": args.min_site_size,
        "holdout_fraction": args.holdout,
        "expected_batch_size": args.batch_size,
        "split_ratios": None if args.split is None else parse_ratios(args.split),
    }
    options.update({k: v for k, v in optional.items() if v is not None})
    return SiteSettings(setup=args.setup, num_sites=args.sites, seed=args.seed, **options)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse ``"0.7,0.15,0.15"`` into three floats (checked further by SiteSettings)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--split must be three numbers train,val,test like 0.7,0.15,0.15; got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"--split must be three numbers train,val,test like 0.7,0.15,0.15; got {text!r}")
    return values  # type: ignore[return-value]


def load_records(data: Path) -> tuple[pd.DataFrame, str]:
    """Return the records frame of ``data`` and the name to use for it in messages.

    A ``.csv`` file is a records table. A folder with the RSNA labels file but no image
    folder is read from its label, class and header files. Any other folder goes to the
    dataset reader of ``common.data``, which reads the attributes from the DICOM headers.
    """
    from common.sites.frames import RSNA_LABELS_FILE, read_records_csv, rsna_metadata_frame

    if not data.exists():
        raise FileNotFoundError(f"DATA {data} not found; give a dataset folder or a records CSV")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise ValueError(f"DATA {data} is a file but not a .csv records table")
        return read_records_csv(data), str(data)
    if (data / RSNA_LABELS_FILE).is_file() and not (data / RSNA_IMAGES_DIR).is_dir():
        return rsna_metadata_frame(data), str(data)
    from common.data import load_dataset

    return load_dataset(data).frame(), str(data)


def format_summary(summary: pd.DataFrame) -> str:
    """Return the summary transposed (one column per site): counts as integers, shares and
    rates with 3 decimals, ``-`` where a value is undefined."""
    names = [HOLDOUT_SPLIT if s == HOLDOUT_SITE else f"site {s}" for s in summary["site"]]
    table = summary.drop(columns="site").set_axis(names, axis=0)
    text = {column: table[column].map(_format_cell) for column in table.columns}
    return type(table)(text).T.to_string()


def _format_cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3f}"  # NaN is the only value unequal to itself
    return str(value)
