"""``dpfedseg deploy``: run the Flower apps as real SuperLink/SuperNode processes on loopback."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = Path("outputs/deploy")
OPTION_FOR_KEY = {
    "num-sites": "--sites",
    "num-server-rounds": "--rounds",
    "output-dir": "--out",
    "data-dir": "--data or --site-data",
    "manifest": "--manifest",
    "site-dir": "--site-dir",
    "cache-dir": "--cache-dir",
}
"""Run settings that deploy sets from its own options, and the option to use instead."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="run one SuperLink and K SuperNodes on 127.0.0.1 (optionally with TLS)",
        description=(
            "Run the federated job as real processes on this machine: one Flower SuperLink "
            "and one SuperNode per site on 127.0.0.1, each on its own free port, with a "
            "Flower home in the work folder; then `flwr run` of the project, and every "
            "started process stopped at the end. Each site keeps its privacy ledger in its "
            "own site folder, so rerunning with -c resume=true and the same --out continues "
            "after the last finished round. docs/DEPLOYMENT.md shows the same deployment "
            "across machines."
        ),
    )
    parser.add_argument("--sites", type=int, metavar="K",
                        help="number of sites (SuperNodes); default: the number of --site-data folders")
    parser.add_argument("--tls", action="store_true",
                        help="generate a self-signed CA and server certificate in WORKDIR/certs "
                             "and run every connection over TLS")
    parser.add_argument("--supernode-auth", action="store_true",
                        help="with --tls: generate a key pair per SuperNode, register the public "
                             "keys with the SuperLink and reject any other SuperNode")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="dataset root shared by the sites, split by --manifest")
    parser.add_argument("--manifest", type=Path, metavar="CSV",
                        help="sites manifest from `dpfedseg sites` (site and split per image)")
    parser.add_argument("--site-data", type=Path, nargs="+", default=[], metavar="DIR",
                        help="one data folder per site, in site order; each folder is that "
                             "site's whole shard (no manifest)")
    parser.add_argument("--site-dir", type=Path, nargs="+", default=[], metavar="DIR",
                        help="one folder per site for its privacy ledger "
                             "(default: WORKDIR/sites/site-K)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="decoded-image cache the sites use (default: the project's cache)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, metavar="DIR",
                        help=f"folder for logs, certificates, the SuperLink database, the Flower "
                             f"home and the sites' folders (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="run folder the server writes results to (default: WORKDIR/run)")
    parser.add_argument("--rounds", type=int, metavar="N", help="number of server rounds")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run setting (the keys of [tool.flwr.app.config] in "
                             "pyproject.toml, e.g. -c image-size=128 -c resume=true); repeatable")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop everything after this many seconds "
                             "(default: 2 x round-timeout per round + 300)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simulations.deploy import plan_sites, run_deployment

    if args.supernode_auth and not args.tls:
        raise ValueError("--supernode-auth needs --tls: Flower accepts SuperNode keys only over TLS")
    workdir = args.workdir.expanduser().resolve()
    sites = plan_sites(
        args.sites,
        workdir=workdir,
        data_dir=args.data,
        manifest=args.manifest,
        site_data=args.site_data,
        site_dirs=args.site_dir,
        cache_dir=args.cache_dir,
    )
    config = build_config(args, workdir=workdir, num_sites=len(sites))
    result = run_deployment(
        config, sites, workdir=workdir, tls=args.tls, supernode_auth=args.supernode_auth,
        timeout=args.timeout,
    )
    for site in sites:
        log.info("site %d: ledger in %s", site.site, site.site_dir)
    print(result.run_dir)
    return 0


def build_config(args: argparse.Namespace, *, workdir: Path, num_sites: int):
    """Return the run configuration: defaults, then ``-c`` overrides, then deploy's own options."""
    from common.config import RunConfig
    from simulations.cmd_compare import parse_pairs

    values = RunConfig().to_run_config()
    for key, value in parse_pairs(args.config, "-c").items():
        if key in OPTION_FOR_KEY:
            raise ValueError(f"-c {key}=... is set by deploy; use {OPTION_FOR_KEY[key]}")
        if key not in values:
            raise ValueError(f"unknown run setting {key!r} in -c; valid keys: {', '.join(sorted(values))}")
        values[key] = value
    values["num-sites"] = num_sites
    values["output-dir"] = str((args.out or workdir / "run").expanduser().resolve())
    if args.rounds is not None:
        values["num-server-rounds"] = args.rounds
    if args.data is not None:
        values["data-dir"] = str(args.data.expanduser().resolve())
    if args.manifest is not None:
        values["manifest"] = str(args.manifest.expanduser().resolve())
    if args.cache_dir is not None:
        values["cache-dir"] = str(args.cache_dir.expanduser().resolve())
    return RunConfig.from_run_config(values)
