"""``dpfedseg privacy``: epsilon from each accountant, or a calibrated noise multiplier.

Examples::

    dpfedseg privacy --sample-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5
    dpfedseg privacy --sample-rate 0.01 --target-epsilon 8 --steps 1000 --json

The table rounds every epsilon and noise multiplier up, never down, to
:data:`DECIMALS` decimals, so a number copied from it never under-states the privacy
loss or the noise needed. ``--json`` prints the unrounded values.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from common.config import ACCOUNTANTS, _check_range

DECIMALS = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "privacy",
        help="compute epsilon (RDP, PRV, PLD) or calibrate the noise multiplier",
        description=(
            "Privacy of DP-SGD with Poisson sampling: print epsilon from the RDP, PRV and PLD "
            "accountants for a noise multiplier, or calibrate the smallest noise multiplier "
            "that keeps epsilon within --target-epsilon. Give exactly one of "
            "--noise-multiplier and --target-epsilon."
        ),
    )
    parser.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        help="Poisson sampling probability q of each example per step: expected batch size / "
        "examples at the site, in (0, 1]",
    )
    parser.add_argument(
        "--steps",
        type=int,
        required=True,
        help="DP-SGD steps T of the whole run at that site: rounds x local epochs x steps "
        "per epoch",
    )
    parser.add_argument(
        "--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default 1e-5)"
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        help="sigma: noise std in units of the clipping bound; prints epsilon for it",
    )
    parser.add_argument(
        "--target-epsilon",
        type=float,
        help="epsilon budget; prints the smallest noise multiplier that stays within it",
    )
    parser.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="rdp",
        help="accountant that calibrates the noise multiplier (default rdp; pld takes "
        "seconds to minutes)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="relative precision of the calibrated noise multiplier (default 0.01)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print unrounded results as one JSON object"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the epsilon table, calibrating the noise multiplier first when asked."""
    from common.privacy.accounting import calibrate_noise_multiplier, epsilon_table
    from common.privacy.ledger import LedgerEntry

    _check_arguments(args)
    result: dict[str, Any] = {
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "delta": args.delta,
        "noise_multiplier": args.noise_multiplier,
        "target_epsilon": args.target_epsilon,
        "calibration_accountant": None,
    }
    if args.target_epsilon is not None:
        result["noise_multiplier"] = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            sample_rate=args.sample_rate,
            steps=args.steps,
            accountant=args.accountant,
            tolerance=args.tolerance,
        )
        result["calibration_accountant"] = args.accountant
    entry = LedgerEntry(
        noise_multiplier=result["noise_multiplier"],
        sample_rate=args.sample_rate,
        steps=args.steps,
    )
    result["epsilons"] = epsilon_table([entry], delta=args.delta)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 1 if any(row["error"] for row in result["epsilons"]) else 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag unless every numeric flag is finite and in range.

    The accountants misreport a NaN or an infinity instead of rejecting it (a NaN tolerance
    even returns a wrong noise multiplier), so every flag is checked here, before them.
    """
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ValueError(
            "give exactly one of --noise-multiplier (to compute epsilon) and --target-epsilon "
            "(to calibrate the noise multiplier)"
        )
    _check_range("--sample-rate", args.sample_rate, low=0.0, high=1.0, low_open=True)
    _check_range("--delta", args.delta, low=0.0, high=1.0, low_open=True, high_open=True)
    _check_range("--tolerance", args.tolerance, low=0.0, high=0.5, low_open=True, high_open=True)
    if args.noise_multiplier is not None:
        _check_range("--noise-multiplier", args.noise_multiplier, low=0.0, low_open=True)
        _check_range("--steps", args.steps, low=0)
    else:
        _check_range("--target-epsilon", args.target_epsilon, low=0.0, low_open=True)
        _check_range("--steps", args.steps, low=1)


def round_up(value: float, decimals: int = DECIMALS) -> float:
    """Return ``value`` rounded towards +infinity at ``decimals`` decimals."""
    scale = 10**decimals
    return math.ceil(value * scale) / scale


def format_result(result: dict[str, Any]) -> str:
    """Return the human-readable report: the mechanism, the calibration, the epsilon table."""
    sigma = round_up(result["noise_multiplier"])
    lines = []
    if result["calibration_accountant"] is not None:
        lines.append(
            f"calibrated noise_multiplier {sigma:.{DECIMALS}f} keeps epsilon <= "
            f"{result['target_epsilon']:g} ({result['calibration_accountant']} accountant)"
        )
    lines.append(
        f"DP-SGD with Poisson sampling: noise_multiplier {sigma:.{DECIMALS}f}, sample_rate "
        f"{result['sample_rate']:g}, steps {result['steps']}, delta {result['delta']:g}"
    )
    lines.append(f"epsilon rounded up to {DECIMALS} decimals")
    lines.append("")
    rows = [("accountant", "epsilon", "method")]
    for row in result["epsilons"]:
        epsilon = "failed" if row.get("error") else f"{round_up(row['epsilon']):.{DECIMALS}f}"
        rows.append((row["accountant"], epsilon, row["label"]))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    for name, epsilon, label in rows:
        lines.append(f"{name:<{widths[0]}}  {epsilon:>{widths[1]}}  {label}")
    failures = [row for row in result["epsilons"] if row.get("error")]
    if failures:
        lines.append("")
        lines.extend(f"{row['accountant']} failed: {row['error']}" for row in failures)
    return "\n".join(lines)
