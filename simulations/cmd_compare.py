"""``dpfedseg compare``: RS vs automatic clipping across multi-center setups."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.config import METHODS

log = logging.getLogger(__name__)

PER_RUN_KEYS = {
    "method": "--methods",
    "seed": "--seeds",
    "data-dir": "--data",
    "output-dir": "--out",
    "manifest": "--setups and --site-option",
    "resume": "rerunning the same command (finished runs are skipped)",
    "calibrate-noise": "--match epsilon or --epsilons",
}
"""Run settings the comparison sets per run, and the option that controls each instead."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from simulations.presets import PRESETS

    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    parser = subparsers.add_parser(
        "compare",
        help="run the method x setup x seed comparison through Flower's simulation",
        description=(
            "Train every method on every multi-center setup and seed, each run a Flower "
            "simulation of the federation, then write plots and tables to OUT/comparison/. "
            "Rerunning the same command skips finished runs and resumes an unfinished one "
            f"from its checkpoint. Presets: {presets}."
        ),
    )
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="starting configuration (default: demo)")
    parser.add_argument("--data", type=Path,
                        help="dataset root (RSNA layout); the demo generates synthetic data "
                             "when this is not given")
    parser.add_argument("--out", type=Path, default=Path("outputs"),
                        help="outputs folder (default: outputs)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                        help=f"methods to compare, from {', '.join(METHODS)} "
                             "(default: the preset's, rs and automatic)")
    parser.add_argument("--setups", nargs="+", metavar="SETUP",
                        help="site setups: iid, label-skew, quantity-skew, attribute, "
                             "scanner-shift, column (default: the preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="K",
                        help="seeds; each draws its own partition and training randomness")
    parser.add_argument("--sites", type=int, metavar="N", help="number of sites")
    parser.add_argument("--match", choices=("noise", "epsilon"), default="noise",
                        help="noise: every DP method gets the same noise multiplier, sample "
                             "rate and steps (equal epsilon by construction); epsilon: each "
                             "calibrates its noise to target-epsilon (default: noise)")
    parser.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                        help="sweep these target epsilons, noise calibrated per value; adds "
                             "privacy_utility.png")
    parser.add_argument("--init-weights", type=Path, metavar="FILE",
                        help="state-dict file every method starts from")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run setting (the keys of [tool.flwr.app.config] in "
                             "pyproject.toml, e.g. -c num-server-rounds=5 -c image-size=128); "
                             "repeatable")
    parser.add_argument("--site-option", action="append", default=[], metavar="KEY=VALUE",
                        help="partition setting (alpha, min-site-size, attribute, purity, "
                             "split-ratios=0.7,0.15,0.15, holdout-fraction, ...); repeatable")
    parser.add_argument("--run-timeout", type=float, metavar="SECONDS",
                        help="stop a run that takes longer than this (default: from round-timeout)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned runs and what a rerun would do, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simulations.cmd_report import print_report
    from simulations.compare import run_comparison
    from simulations.flower_processes import stop_idle_superlink

    spec = build_spec(args)
    if args.dry_run:
        print_plan(spec)
        return 0
    try:
        print_report(run_comparison(spec))
    finally:
        # The SuperLink that `flwr run` started would otherwise outlive the command.
        stop_idle_superlink()
    return 0


def build_spec(args: argparse.Namespace):
    """Merge the preset with the command-line options into a validated ``CompareSpec``."""
    from common.config import RunConfig
    from simulations.compare import CompareSpec
    from simulations.presets import get_preset

    preset = get_preset(args.preset)
    values = RunConfig(**preset.config).to_run_config()
    for key, value in parse_pairs(args.config, "-c").items():
        if key in PER_RUN_KEYS:
            raise ValueError(
                f"-c {key}=... is set per run by the comparison; use {PER_RUN_KEYS[key]}"
            )
        if key not in values:
            raise ValueError(
                f"unknown run setting {key!r} in -c; valid keys: {', '.join(sorted(values))}"
            )
        values[key] = value
    if args.sites is not None:
        values["num-sites"] = args.sites
    if args.init_weights is not None:
        if not args.init_weights.is_file():
            raise FileNotFoundError(f"--init-weights file {args.init_weights} not found")
        values["init-weights"] = str(args.init_weights.resolve())
    base = RunConfig.from_run_config(values)
    site_options = {**preset.site_options, **_site_options(args.site_option)}
    return CompareSpec(
        base=base,
        data_dir=_data_dir(args, preset),
        outputs=args.out,
        methods=tuple(args.methods or preset.methods),
        setups=tuple(args.setups or preset.setups),
        seeds=tuple(args.seeds if args.seeds is not None else preset.seeds),
        match=args.match,
        sweep_epsilons=tuple(args.epsilons or ()),
        site_options=site_options,
        run_timeout=args.run_timeout,
    )


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """Split ``KEY=VALUE`` items into a dict; raise ValueError naming a malformed item."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def print_plan(spec) -> None:
    """Print one line per planned run with what running the command would do to it.

    "reject" marks a run whose saved state the command would refuse, with the reason
    on the next line.
    """
    from simulations.compare import plan_runs, rerun_problem, resume_action

    plan = plan_runs(spec)
    print(f"{len(plan)} runs in {spec.outputs} (data: {spec.data_dir}):")
    for run in plan:
        eps = "" if run.sweep_epsilon is None else f" target epsilon {run.sweep_epsilon:g}"
        problem = rerun_problem(spec, run)
        action = "reject" if problem else resume_action(run.folder(spec.outputs))
        print(f"  {action:<6} {run.label()}{eps}")
        if problem:
            print(f"         {problem}")


def _site_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for key, text in parse_pairs(items, "--site-option").items():
        options[key.replace("-", "_")] = _parse_value(text)
    return options


def _parse_value(text: str) -> object:
    # Partition settings are ints, floats, names or a comma-separated ratio triple;
    # SiteSettings validates the result and names the bad value.
    if "," in text:
        return tuple(float(part) for part in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _data_dir(args: argparse.Namespace, preset) -> Path:
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data folder {args.data} not found")
        return args.data.resolve()
    if preset.synthetic is None:
        raise ValueError(
            f"preset {preset.name!r} needs real data: pass --data DIR, the folder holding "
            "stage_2_train_labels.csv and stage_2_train_images/"
        )
    if args.dry_run:
        return preset.synthetic.folder()
    return preset.synthetic.ensure()
