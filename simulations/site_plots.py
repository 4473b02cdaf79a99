"""The partition plot: per-site size, positive rate and attribute mix in one PNG.

Built on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so it never touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import write_bytes
from common.sites.columns import MIX_COLUMNS, MIX_SEPARATOR
from common.sites.settings import HOLDOUT_SITE, HOLDOUT_SPLIT, SPLITS

PANEL_COLUMNS = 2
PANEL_SIZE_INCHES = (5.5, 3.4)
DPI = 100
SPLIT_COLORS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868", HOLDOUT_SPLIT: "#8C8C8C"}


def partition_figure(summary: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Draw the summary of a partition (see ``common.sites.summary.summarize``).

    Panels, in order: images per site stacked by split, positive rate per site with the
    overall rate as a dashed line, then one panel per attribute of the summary's mix
    (``ViewPosition``, ``PatientSex``, ``age_band``, ``class_name``) with its values'
    shares stacked.
    """
    attributes = [a for a in MIX_COLUMNS if _mix_columns(summary, a)]
    panels = 2 + len(attributes)
    rows = -(-panels // PANEL_COLUMNS)
    figure = Figure(figsize=(PANEL_SIZE_INCHES[0] * PANEL_COLUMNS, PANEL_SIZE_INCHES[1] * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, PANEL_COLUMNS, squeeze=False).ravel()
    labels = _site_labels(summary)
    _draw_sizes(axes[0], summary, labels)
    _draw_positive_rate(axes[1], summary, labels)
    for axis, attribute in zip(axes[2:], attributes):
        _draw_mix(axis, summary, labels, attribute)
    for axis in axes[panels:]:
        figure.delaxes(axis)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def save_partition_plot(summary: pd.DataFrame, path: str | PathLike, *, title: str | None = None) -> Path:
    """Write :func:`partition_figure` as a PNG to ``path`` atomically and return the path."""
    buffer = io.BytesIO()
    partition_figure(summary, title=title).savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
    return Path(path)


def _site_labels(summary: pd.DataFrame) -> list[str]:
    labels = []
    for index, site in enumerate(summary["site"]):
        if site == HOLDOUT_SITE:
            labels.append(HOLDOUT_SPLIT)
            continue
        label = str(site)
        for extra in ("site_name", "dominant"):
            if extra in summary.columns and summary[extra].iloc[index]:
                label += f"\n{summary[extra].iloc[index]}"
        labels.append(label)
    return labels


def _draw_sizes(axis, summary: pd.DataFrame, labels: list[str]) -> None:
    positions = np.arange(len(summary))
    bottom = np.zeros(len(summary))
    for split in (*SPLITS, HOLDOUT_SPLIT):
        counts = summary[split].to_numpy(dtype=float)
        if counts.any():
            axis.bar(positions, counts, bottom=bottom, label=split, color=SPLIT_COLORS[split])
            bottom += counts
    axis.set_title("images per site")
    axis.set_ylabel("images")
    axis.set_xticks(positions, labels)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _draw_positive_rate(axis, summary: pd.DataFrame, labels: list[str]) -> None:
    positions = np.arange(len(summary))
    axis.bar(positions, summary["positive_rate"].to_numpy(dtype=float), color="#C44E52")
    overall = summary["positives"].sum() / summary["images"].sum()
    axis.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"all images ({overall:.3f})")
    axis.set_title("positive rate (images with a lung opacity)")
    axis.set_ylabel("share of images")
    axis.set_ylim(0, 1)
    axis.set_xticks(positions, labels)
    axis.legend(fontsize="small")


def _draw_mix(axis, summary: pd.DataFrame, labels: list[str], attribute: str) -> None:
    positions = np.arange(len(summary))
    bottom = np.zeros(len(summary))
    for column in _mix_columns(summary, attribute):
        shares = summary[column].to_numpy(dtype=float)
        axis.bar(positions, shares, bottom=bottom, label=column.split(MIX_SEPARATOR, 1)[1])
        bottom += shares
    axis.set_title(f"{attribute} mix")
    axis.set_ylabel("share of images")
    axis.set_ylim(0, 1)
    axis.set_xticks(positions, labels)
    axis.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _mix_columns(summary: pd.DataFrame, attribute: str) -> list[str]:
    prefix = f"{attribute}{MIX_SEPARATOR}"
    return [c for c in summary.columns if c.startswith(prefix)]
