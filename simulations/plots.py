"""The comparison's figures, drawn from the tables of :mod:`simulations.summary`.

Figures use matplotlib's object-oriented API on the Agg canvas (no pyplot state, no display)
and are written atomically as PNG. Every figure has one panel per setup (per setup and target
epsilon in an ``--epsilons`` sweep). Bands and error bars are 95% Student-t intervals over
seeds; with one seed the legend shows ``n=1`` and no band is drawn.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.atomic import write_bytes
from simulations.summary import (
    METHOD_FOLDERS,
    METHOD_LABELS,
    final_per_run,
    final_per_site,
    mean_ci,
    method_order,
    per_round,
    site_sort_key,
)

log = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy_comparison.png"
PRIVACY_PNG = "privacy_comparison.png"
PER_SITE_PNG = "per_site_dice.png"
COMMUNICATION_PNG = "communication.png"
ROUND_TIME_PNG = "round_time.png"
PRIVACY_UTILITY_PNG = "privacy_utility.png"

_COLORS = dict(
    zip(METHOD_FOLDERS, ("#d62728", "#1f77b4", "#9467bd", "#2ca02c", "#ff7f0e", "#7f7f7f"))
)
_PANEL_INCHES = (4.6, 3.4)
_DPI = 110
_MIB = 1024.0 * 1024.0
_METRIC_LABELS = {"test_dice": "test Dice", "val_dice": "validation Dice"}
_UNIT_RANGE = (0.0, 1.0)
_NON_NEGATIVE = (0.0, None)


def write_plots(rounds: pd.DataFrame, folder: Path) -> list[Path]:
    """Draw every figure of ``rounds`` (from :func:`summary.load_rounds`) into ``folder``.

    ``privacy_utility.png`` is drawn only when the runs sweep the target epsilon.
    Returns the paths written.
    """
    folder = Path(folder)
    if rounds.empty:
        log.warning("no finished runs: no figures drawn in %s", folder)
        return []
    by_round = per_round(rounds)
    written = [
        plot_accuracy(by_round, folder / ACCURACY_PNG),
        plot_privacy(rounds, folder / PRIVACY_PNG),
        plot_per_site_dice(final_per_site(rounds), folder / PER_SITE_PNG),
        plot_communication(by_round, folder / COMMUNICATION_PNG),
        plot_round_time(by_round, folder / ROUND_TIME_PNG),
    ]
    if rounds["sweep_epsilon"].notna().any():
        written.append(plot_privacy_utility(final_per_run(rounds), folder / PRIVACY_UTILITY_PNG))
    return written


def plot_accuracy(by_round: pd.DataFrame, path: Path) -> Path:
    """Validation Dice per round, over all images and over positive images only.

    Each value is the mean over sites; lines are the mean over seeds with a 95% band. The
    positive-only row matters because an all-empty prediction already scores well on the
    negative images.
    """
    return _per_round_figure(
        by_round,
        [
            ("val_dice", "validation Dice, all images\n(mean over sites)", _UNIT_RANGE),
            ("val_dice_positive", "validation Dice, positive images\n(mean over sites)",
             _UNIT_RANGE),
        ],
        path,
        title="Accuracy",
    )


def plot_round_time(by_round: pd.DataFrame, path: Path) -> Path:
    """Server wall time per round: mean and 95% band over seeds per method."""
    return _per_round_figure(
        by_round,
        [("round_seconds", "round wall time (s)", _NON_NEGATIVE)],
        path,
        title="Time per round",
    )


def plot_communication(by_round: pd.DataFrame, path: Path) -> Path:
    """Bytes one site uploads per round (mean over uploading sites), per method."""
    frame = by_round.assign(upload_mib=by_round["upload_bytes"] / _MIB)
    return _per_round_figure(
        frame,
        [("upload_mib", "upload per site (MiB)", _NON_NEGATIVE)],
        path,
        title="Communication per round",
    )


def plot_privacy(rounds: pd.DataFrame, path: Path) -> Path:
    """Cumulative epsilon per round: one thin line per site and a thick line for the maximum.

    Rows are setups, columns the private methods; each value is the maximum over seeds.
    """
    private = rounds[rounds["method"] != "none"]
    panels = _panel_keys(rounds)
    methods = method_order(private["method"]) or ["none"]
    fig, axes = _figure(len(panels), len(methods))
    for row, (panel, label) in enumerate(panels):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            data = _select(private, panel)
            data = data[data["method"] == method]
            if data.empty:
                _empty(ax, f"{label}\n{METHOD_LABELS.get(method, method)}")
                continue
            per_site = data.groupby(["site", "server_round"])["epsilon_site"].max().unstack(0)
            for site in per_site.columns:
                ax.plot(per_site.index, per_site[site], lw=1, alpha=0.7, label=f"site {site}")
            ax.plot(per_site.index, per_site.max(axis=1), "k--", lw=2.2, label="max over sites")
            ax.set_ylim(bottom=0.0)
            delta = data["delta"].dropna()
            accountant = "/".join(sorted(set(data["accountant"].dropna().astype(str))))
            ax.set_title(f"{label}: {METHOD_LABELS.get(method, method)}", fontsize=9)
            ax.set_xlabel("server round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            suffix = f" ({accountant}, δ={delta.iloc[0]:g})" if len(delta) else ""
            ax.set_ylabel("cumulative ε" + suffix)
            ax.legend(fontsize=7)
    fig.suptitle("Privacy per round (worst seed)")
    return _save(fig, path)


def plot_per_site_dice(sites: pd.DataFrame, path: Path) -> Path:
    """Final Dice per site per method (test split, or validation when no test was run)."""
    metric = "test_dice" if sites["test_dice"].notna().any() else "val_dice"
    panels = _panel_keys(sites)
    fig, axes = _figure(1, len(panels))
    for col, (panel, label) in enumerate(panels):
        ax = axes[0][col]
        data = _select(sites, panel)
        methods = method_order(data["method"])
        site_ids = sorted(data["site"].unique(), key=site_sort_key)
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            stats = [
                mean_ci(data[(data["method"] == method) & (data["site"] == s)][metric])
                for s in site_ids
            ]
            means = [s[0] for s in stats]
            errors = [s[1] for s in stats]
            x = np.arange(len(site_ids)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, means, width, color=_COLORS.get(method),
                   label=_legend(method, max((s[2] for s in stats), default=0)))
            if any(np.isfinite(errors)):
                ax.errorbar(x, means, yerr=_dice_error_bars(means, errors), fmt="none",
                            ecolor="black", capsize=3)
        ax.set_xticks(np.arange(len(site_ids)), [f"site {s}" for s in site_ids])
        ax.set_ylabel(f"final {_METRIC_LABELS[metric]}")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Final Dice per site")
    return _save(fig, path)


def plot_privacy_utility(final: pd.DataFrame, path: Path) -> Path:
    """Final Dice against the target epsilon per method; non-private as a dashed line.

    The achieved epsilon of each run is in the summary table: calibration keeps it at or
    under the target.
    """
    metric = "test_dice" if final["test_dice"].notna().any() else "val_dice"
    setups = list(dict.fromkeys(final["setup"]))
    fig, axes = _figure(1, len(setups))
    for col, setup in enumerate(setups):
        ax = axes[0][col]
        data = final[final["setup"] == setup]
        for method in method_order(data["method"]):
            runs = data[data["method"] == method]
            if method == "none":
                mean, _, n = mean_ci(runs[metric])
                ax.axhline(mean, color=_COLORS["none"], ls="--", label=_legend(method, n))
                continue
            points = []
            for eps, group in runs.groupby("sweep_epsilon"):
                mean, half, n = mean_ci(group[metric])
                points.append((eps, mean, half, n))
            points.sort()
            xs, ys, halves, ns = zip(*points) if points else ((), (), (), ())
            ax.errorbar(xs, ys, yerr=_dice_error_bars(ys, halves), marker="o", capsize=3,
                        color=_COLORS.get(method), label=_legend(method, min(ns) if ns else 0))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target ε per site (noise calibrated per value)")
        ax.set_ylabel(f"final {_METRIC_LABELS[metric]}")
        ax.set_title(setup, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Privacy-utility trade-off")
    return _save(fig, path)


# ----- shared drawing ---------------------------------------------------------------------


def _per_round_figure(
    by_round: pd.DataFrame, rows: list[tuple[str, str, tuple]], path: Path, *, title: str
) -> Path:
    """Draw one row of panels per ``(column, ylabel, (low, high))`` in ``rows``, one per setup.

    Bands are clipped to ``(low, high)``, the range the quantity can take: with few seeds
    a t-interval easily reaches a negative time or a Dice above 1.
    """
    panels = _panel_keys(by_round)
    fig, axes = _figure(len(rows), len(panels))
    for row, (column, ylabel, limits) in enumerate(rows):
        for col, (panel, label) in enumerate(panels):
            ax = axes[row][col]
            data = _select(by_round, panel)
            for method in method_order(data["method"]):
                _band(ax, data[data["method"] == method], column, method, limits)
            ax.set_xlabel("server round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            ax.set_title(label, fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _band(ax, data: pd.DataFrame, column: str, method: str, limits: tuple) -> None:
    """Draw the mean over seeds of ``column`` per round with its 95% band, clipped to ``limits``."""
    rounds, means, lows, highs, count = [], [], [], [], 0
    for server_round, group in data.groupby("server_round"):
        mean, half, n = mean_ci(group[column])
        rounds.append(server_round)
        means.append(mean)
        lows.append(mean - half)
        highs.append(mean + half)
        count = max(count, n)
    color = _COLORS.get(method)
    ax.plot(rounds, means, marker="o", ms=3, color=color, label=_legend(method, count))
    if count > 1:
        low, high = limits
        ax.fill_between(rounds, np.clip(lows, low, high), np.clip(highs, low, high),
                        color=color, alpha=0.2)


def _dice_error_bars(means, halves) -> np.ndarray:
    """Return the ``(2, n)`` lower and upper error-bar lengths of Dice, kept inside [0, 1]."""
    means = np.asarray(means, dtype=float)
    halves = np.nan_to_num(np.asarray(halves, dtype=float))
    low, high = _UNIT_RANGE
    return np.vstack([np.minimum(halves, means - low), np.minimum(halves, high - means)])


def _panel_keys(frame: pd.DataFrame) -> list[tuple[tuple, str]]:
    """Return ``((setup, sweep_epsilon), label)`` per panel, sorted by setup and epsilon.

    In a sweep the non-private reference gets no panel of its own: :func:`_select` draws
    it in every target-epsilon panel of its setup.
    """
    swept = frame["sweep_epsilon"].notna().any()
    rows = frame[frame["method"] != "none"] if swept else frame
    keys = rows[["setup", "sweep_epsilon"]].drop_duplicates()
    keys = keys.sort_values(["setup", "sweep_epsilon"], na_position="first")
    out = []
    for setup, eps in keys.itertuples(index=False):
        label = setup if pd.isna(eps) else f"{setup}, target ε {eps:g}"
        out.append(((setup, eps), label))
    return out


def _select(frame: pd.DataFrame, panel: tuple) -> pd.DataFrame:
    setup, eps = panel
    same_eps = frame["sweep_epsilon"].isna() if pd.isna(eps) else frame["sweep_epsilon"] == eps
    if frame["sweep_epsilon"].notna().any() and not pd.isna(eps):
        # The non-private reference is not swept: show it in every target-epsilon panel.
        same_eps = same_eps | ((frame["method"] == "none") & frame["sweep_epsilon"].isna())
    return frame[(frame["setup"] == setup) & same_eps]


def _legend(method: str, n: int) -> str:
    return f"{METHOD_LABELS.get(method, method)} (n={n})"


def _figure(rows: int, cols: int):
    rows, cols = max(1, rows), max(1, cols)
    fig = Figure(figsize=(_PANEL_INCHES[0] * cols, _PANEL_INCHES[1] * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _empty(ax, label: str) -> None:
    ax.set_title(label, fontsize=9)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    write_bytes(path, buffer.getvalue())
    return Path(path)
