"""Read a comparison's run folders back and reduce them to per-round, per-run and summary tables.

Everything here reads only the files named in :mod:`common.results`, so ``dpfedseg report``
rebuilds the same tables from a saved ``outputs/`` folder as ``dpfedseg compare`` does.

Layout of an outputs folder::

    outputs/<method folder>/<setup>-seed<k>[-eps<e>]/   one run folder (common/results.py)
    outputs/manifests/<setup>-seed<k>.csv               the sites manifest shared by all methods
    outputs/comparison/                                 plan.json, plots, summary.csv, summary.md

Conventions:

- Validation and test Dice of a run are the mean over its sites (each site weighs the same)
  of the last value each site reported; sites whose evaluation failed are left out of the mean.
- The epsilon of a site is ``max(epsilon, epsilon_server)``: the larger of what the site
  reported and what the server recomputed from the ledger, so a disagreement never lowers it.
  A round a site sat out carries its previous cumulative epsilon forward.
- Across seeds, a privacy number is the maximum over seeds (the worst case a user must quote);
  accuracy and time are the mean with a 95% Student-t interval over seeds.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import results

log = logging.getLogger(__name__)

METHOD_FOLDERS = {
    "rs": "rs_training",
    "automatic": "automatic_clipping",
    "rs-automatic": "rs_automatic",
    "adaptive": "adaptive_clipping",
    "flat": "flat_clipping",
    "none": "non_private",
}
"""Output folder of each method; the order is the order of every table and legend."""

METHOD_LABELS = {
    "rs": "RS (random sparsification)",
    "automatic": "AC (automatic clipping)",
    "rs-automatic": "RS + AC",
    "adaptive": "adaptive clipping",
    "flat": "flat DP-SGD",
    "none": "non-private",
}

COMPARISON_DIR = "comparison"
MANIFEST_DIR = "manifests"
PLAN_FILE = "plan.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"

RUN_KEYS = ("method", "setup", "sweep_epsilon", "seed")
"""Columns that identify one run; ``sweep_epsilon`` is NaN outside an ``--epsilons`` sweep."""

GROUP_KEYS = ("method", "setup", "sweep_epsilon")
"""Columns of one summary row: a run group that differs only by seed."""

_RUN_NAME = re.compile(
    r"^(?P<setup>.+)-seed(?P<seed>\d+)(?:-eps(?P<eps>\d+(?:\.\d+)?(?:e-?\d+)?))?$"
)
_FINAL_COLUMNS = (
    "val_dice",
    "val_dice_positive",
    "val_fpr",
    "test_dice",
    "test_dice_positive",
    "test_fpr",
)


def run_name(setup: str, seed: int, sweep_epsilon: float | None = None) -> str:
    """Return the run folder name ``<setup>-seed<k>[-eps<e>]`` (``e`` in ``%g`` form)."""
    name = f"{setup}-seed{seed}"
    if sweep_epsilon is not None:
        name += f"-eps{sweep_epsilon:g}"
    return name


def parse_run_name(name: str) -> tuple[str, int, float | None]:
    """Split a run folder name into ``(setup, seed, sweep_epsilon or None)``."""
    match = _RUN_NAME.match(name)
    if not match:
        raise ValueError(
            f"run folder name {name!r} is not <setup>-seed<k>[-eps<e>], e.g. iid-seed0 or "
            "label-skew-seed1-eps4"
        )
    eps = match["eps"]
    return match["setup"], int(match["seed"]), (float(eps) if eps is not None else None)


def method_order(methods) -> list[str]:
    """Return ``methods`` sorted in the order of :data:`METHOD_FOLDERS`."""
    order = list(METHOD_FOLDERS)
    return sorted(set(methods), key=lambda m: order.index(m) if m in order else len(order))


# ----- loading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    """One run folder found under an outputs folder, with what its name and files state."""

    path: Path
    method: str
    setup: str
    seed: int
    sweep_epsilon: float | None
    config: dict
    status: dict

    @property
    def complete(self) -> bool:
        """Whether ``status.json`` marks the run as finished."""
        return bool(self.status.get("complete", False))


def find_runs(outputs: Path) -> list[RunFolder]:
    """Return every run folder under ``outputs`` that has a ``config.json``.

    Folders named like a method folder but holding no ``config.json`` (a run that never
    started) are skipped with a warning.
    """
    outputs = Path(outputs)
    runs = []
    for method, folder in METHOD_FOLDERS.items():
        for path in sorted((outputs / folder).glob("*")):
            if not path.is_dir() or path.name.startswith("."):
                continue
            config_file = path / results.CONFIG_FILE
            if not config_file.is_file():
                log.warning("run folder %s has no %s; left out", path, results.CONFIG_FILE)
                continue
            setup, seed, eps = parse_run_name(path.name)
            config = _normalise_keys(_read_json(config_file))
            if config.get("method", method) != method:
                raise ValueError(
                    f"{config_file} names method {config.get('method')!r} but lies in the "
                    f"folder of {method!r} ({folder}); move the run to "
                    f"{METHOD_FOLDERS.get(config.get('method'), '?')}/"
                )
            status_file = path / results.STATUS_FILE
            status = _read_json(status_file) if status_file.is_file() else {}
            runs.append(RunFolder(path, method, setup, seed, eps, config, status))
    return runs


def early_stops(runs: list[RunFolder]) -> list[str]:
    """Return one Markdown list line per finished run of ``runs`` that ended before its planned rounds.

    The server stops a run early when every site's privacy budget is spent or every
    sampled site failed. Such a run's final row counts fewer rounds than planned, so the
    summary names it with its reason.
    """
    lines = []
    for run in runs:
        planned, done = run.config.get("num_server_rounds"), run.status.get("last_round")
        if not run.complete or planned is None or done is None or int(done) >= int(planned):
            continue
        reason = run.status.get("stop_reason") or "no reason recorded"
        lines.append(f"- {METHOD_LABELS.get(run.method, run.method)}, {run.path.name}: "
                     f"{int(done)} of {int(planned)} rounds ({reason})")
    return lines


def load_rounds(runs: list[RunFolder]) -> pd.DataFrame:
    """Concatenate the ``rounds.csv`` of ``runs`` with the run keys as leading columns.

    Adds ``epsilon_site``: the site's cumulative epsilon as described in the module notes.
    Runs without a ``rounds.csv`` are left out with a warning.
    """
    frames = []
    for run in runs:
        rounds_file = run.path / results.ROUNDS_FILE
        if not rounds_file.is_file():
            log.warning("run %s has no %s yet; left out", run.path, results.ROUNDS_FILE)
            continue
        frame = pd.read_csv(rounds_file, dtype={"site": str, "reason": str})
        missing = [c for c in results.ROUND_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{rounds_file} lacks the columns {', '.join(missing)}; it was written by an "
                "incompatible version: rerun that run"
            )
        # rounds.csv has its own method column; the run folder's method is authoritative.
        frame["method"] = run.method
        frame["setup"] = run.setup
        frame["sweep_epsilon"] = np.nan if run.sweep_epsilon is None else run.sweep_epsilon
        frame["seed"] = run.seed
        frame["complete"] = run.complete
        frame = frame[[*RUN_KEYS, *[c for c in frame.columns if c not in RUN_KEYS]]]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, *results.ROUND_COLUMNS, "complete", "epsilon_site"])
    rounds = pd.concat(frames, ignore_index=True)
    rounds = rounds.sort_values([*RUN_KEYS, "site", "server_round"], key=_sort_key)
    rounds["epsilon_site"] = np.fmax(rounds["epsilon"], rounds["epsilon_server"])
    run_site = [*RUN_KEYS, "site"]
    rounds["epsilon_site"] = rounds.groupby(run_site, dropna=False)["epsilon_site"].ffill()
    return rounds.reset_index(drop=True)


def load_outputs(outputs: Path, *, complete_only: bool = True) -> pd.DataFrame:
    """Return the rounds of every run under ``outputs``; unfinished runs are dropped by default."""
    return load_rounds(report_runs(outputs, complete_only=complete_only))


def report_runs(outputs: Path, *, complete_only: bool = True) -> list[RunFolder]:
    """Return the run folders under ``outputs``; unfinished ones are dropped by default.

    An unfinished run is named in a warning so a partial report never passes silently.
    """
    runs = find_runs(outputs)
    unfinished = [r for r in runs if not r.complete]
    if complete_only and unfinished:
        names = ", ".join(str(r.path.relative_to(outputs)) for r in unfinished)
        log.warning("%d unfinished run(s) left out of the report: %s", len(unfinished), names)
        runs = [r for r in runs if r.complete]
    return runs


# ----- per round, per site, per run ---------------------------------------------------------


def per_round(rounds: pd.DataFrame) -> pd.DataFrame:
    """Reduce ``rounds`` to one row per run and ``server_round``.

    Columns: ``val_dice`` and ``val_dice_positive`` (mean over sites), ``epsilon_max``
    (max over sites), ``upload_bytes`` (mean over the sites that uploaded, in bytes),
    ``upload_bytes_total``, ``round_seconds`` (server wall time of the round) and
    ``train_seconds`` (mean over sites).
    """
    keys = [*RUN_KEYS, "server_round"]
    ok = rounds["status"] == results.STATUS_OK
    uploaded = rounds["upload_bytes"].where(ok)
    frame = rounds.assign(upload_ok=uploaded)
    grouped = frame.groupby(keys, dropna=False)
    out = grouped.agg(
        val_dice=("val_dice", "mean"),
        val_dice_positive=("val_dice_positive", "mean"),
        epsilon_max=("epsilon_site", "max"),
        upload_bytes=("upload_ok", "mean"),
        upload_bytes_total=("upload_ok", "sum"),
        round_seconds=("round_seconds", "max"),
        train_seconds=("train_seconds", "mean"),
    )
    return out.reset_index()


def final_per_site(rounds: pd.DataFrame) -> pd.DataFrame:
    """Return one row per run and site with the last reported metrics and epsilon.

    Each of :data:`_FINAL_COLUMNS` and ``epsilon_site`` is the last non-empty value in
    round order; ``upload_bytes`` is the site's total over all rounds.
    """
    keys = [*RUN_KEYS, "site"]
    ordered = rounds.sort_values([*keys, "server_round"], key=_sort_key)
    grouped = ordered.groupby(keys, dropna=False)
    last = grouped[[*_FINAL_COLUMNS, "epsilon_site"]].last()
    last["upload_bytes"] = grouped["upload_bytes"].sum(min_count=1)
    last["accountant"] = grouped["accountant"].last()
    last["delta"] = grouped["delta"].last()
    last["noise_multiplier"] = grouped["noise_multiplier"].last()
    return last.reset_index()


def final_per_run(rounds: pd.DataFrame) -> pd.DataFrame:
    """Return one row per run: site-mean final metrics, max epsilon, bytes and wall time.

    ``wall_seconds`` is the sum of the server's round times (Flower and Ray start-up
    excluded); ``seconds_per_round`` is their mean. ``train_seconds_per_round`` is the
    mean over rounds of the sites' mean local training time.
    """
    sites = final_per_site(rounds)
    keys = list(RUN_KEYS)
    grouped = sites.groupby(keys, dropna=False)
    out = grouped[list(_FINAL_COLUMNS)].mean()
    out["epsilon_max"] = grouped["epsilon_site"].max()
    out["upload_bytes_total"] = grouped["upload_bytes"].sum(min_count=1)
    out["accountant"] = grouped["accountant"].last()
    out["delta"] = grouped["delta"].last()
    out["noise_multiplier"] = grouped["noise_multiplier"].max()
    out["num_sites"] = grouped["site"].nunique()
    round_times = rounds.groupby([*keys, "server_round"], dropna=False)["round_seconds"].max()
    by_run = round_times.groupby(keys, dropna=False)
    out["rounds"] = by_run.size()
    out["wall_seconds"] = by_run.sum()
    out["seconds_per_round"] = by_run.mean()
    site_train = rounds.groupby([*keys, "server_round"], dropna=False)["train_seconds"].mean()
    out["train_seconds_per_round"] = site_train.groupby(keys, dropna=False).mean()
    out = out.reset_index()
    for site in sorted(sites["site"].unique(), key=site_sort_key):
        one_site = sites[sites["site"] == site][[*keys, "epsilon_site"]]
        one_site = one_site.rename(columns={"epsilon_site": f"epsilon_site_{site}"})
        out = out.merge(one_site, on=keys, how="left")
    return out


# ----- summary table ------------------------------------------------------------------------


def mean_ci(values) -> tuple[float, float, int]:
    """Return ``(mean, half_width, n)`` of the 95% Student-t interval of the finite ``values``.

    ``half_width = t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (ddof 1). With fewer than two values the half width is NaN: one seed gives no interval.
    """
    from scipy import stats

    data = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = int(data.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(data.mean())
    if n < 2:
        return mean, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1) * data.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def summarize(final: pd.DataFrame) -> pd.DataFrame:
    """Return one row per method x setup (x sweep epsilon) from :func:`final_per_run` rows.

    Accuracy and time: mean and 95% interval half width over seeds (``*_mean``, ``*_ci95``).
    Privacy: ``epsilon_site_<s>`` and ``epsilon_max`` are the maximum over seeds.
    """
    rows = []
    site_columns = [c for c in final.columns if c.startswith("epsilon_site_")]
    for key, group in final.groupby(list(GROUP_KEYS), dropna=False, sort=False):
        row = dict(zip(GROUP_KEYS, key))
        row["seeds"] = int(group["seed"].nunique())
        timed = ("seconds_per_round", "train_seconds_per_round", "wall_seconds")
        for column in ("val_dice", "test_dice", *timed):
            mean, half, _ = mean_ci(group[column])
            row[f"{column}_mean"] = mean
            row[f"{column}_ci95"] = half
        for column in ("test_dice_positive", "test_fpr", "val_dice_positive", "val_fpr"):
            row[f"{column}_mean"] = float(group[column].mean())
        for column in site_columns:
            row[column] = float(group[column].max())
        row["epsilon_max"] = float(group["epsilon_max"].max())
        row["accountant"] = _single(group["accountant"])
        row["delta"] = float(group["delta"].max())
        row["noise_multiplier"] = float(group["noise_multiplier"].max())
        row["upload_bytes_total_mean"] = float(group["upload_bytes_total"].mean())
        row["rounds"] = int(group["rounds"].max())
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {m: i for i, m in enumerate(METHOD_FOLDERS)}
    table = table.sort_values(
        ["setup", "sweep_epsilon", "method"],
        key=lambda col: col.map(order) if col.name == "method" else col,
    )
    # Site columns last, in site order, so the CSV reads left to right like the Markdown.
    columns = [c for c in table.columns if c not in site_columns] + site_columns
    return table[columns].reset_index(drop=True)


def format_ci(mean: float, half: float, n: int | None = None, *, digits: int = 3) -> str:
    """Format ``mean ± half`` (``mean (n=1)`` when there is no interval; ``-`` when empty)."""
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}" + (f" (n={n})" if n is not None else "")
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def summary_markdown(table: pd.DataFrame) -> str:
    """Render :func:`summarize` output as a Markdown table with readable units."""
    if table.empty:
        return "No finished runs.\n"
    site_columns = [c for c in table.columns if c.startswith("epsilon_site_")]
    sweep = table["sweep_epsilon"].notna().any()
    header = ["method", "setup"] + (["target ε"] if sweep else []) + [
        "seeds",
        "val Dice",
        "test Dice",
        "test Dice (positives)",
        "test FPR",
        "ε per site",
        "max ε",
        "upload per run",
        "s / round",
        "wall time",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        n = row["seeds"]
        cells = [METHOD_LABELS.get(row["method"], row["method"]), row["setup"]]
        if sweep:
            cells.append("-" if pd.isna(row["sweep_epsilon"]) else f"{row['sweep_epsilon']:g}")
        cells += [
            str(n),
            format_ci(row["val_dice_mean"], row["val_dice_ci95"], n),
            format_ci(row["test_dice_mean"], row["test_dice_ci95"], n),
            format_ci(row["test_dice_positive_mean"], math.nan),
            format_ci(row["test_fpr_mean"], math.nan),
            _format_site_epsilons(row, site_columns),
            _format_epsilon_max(row),
            format_bytes(row["upload_bytes_total_mean"]),
            format_ci(row["seconds_per_round_mean"], row["seconds_per_round_ci95"], n, digits=1),
            f"{row['wall_seconds_mean']:.0f} s" if np.isfinite(row["wall_seconds_mean"]) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = (
        "\nDice: mean over sites of each site's final value, then mean ± 95% Student-t "
        "interval over seeds (n=1: no interval). ε: per site, the maximum over seeds of "
        "max(site-reported, server-recomputed); the method row gives the accountant and δ. "
        "Wall time: sum of the server's round times, Flower start-up excluded.\n"
    )
    return "\n".join(lines) + "\n" + notes


def format_bytes(value: float) -> str:
    """Format a byte count with a binary prefix (``-`` for NaN)."""
    if not np.isfinite(value):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _format_site_epsilons(row: dict, site_columns: list[str]) -> str:
    if row["method"] == "none":
        return "∞ (no DP)"
    parts = []
    for column in site_columns:
        value = row[column]
        if np.isfinite(value):
            parts.append(f"{column.removeprefix('epsilon_site_')}: {value:.2f}")
    return ", ".join(parts) or "-"


def _format_epsilon_max(row: dict) -> str:
    if row["method"] == "none":
        return "∞"
    if not np.isfinite(row["epsilon_max"]):
        return "-"
    return f"{row['epsilon_max']:.2f} ({row['accountant']}, δ={row['delta']:g})"


# ----- claims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One claim about RS vs AC, the table that tests it and the verdict per run group."""

    statement: str
    metric: str
    table: pd.DataFrame
    verdicts: dict[str, str]

    @property
    def overall(self) -> str:
        """The common verdict word of all groups, or ``mixed`` when the groups disagree."""
        words = {v.split(":")[0] for v in self.verdicts.values()}
        if not words:
            return "undecided: RS or AC was not run"
        return words.pop() if len(words) == 1 else "mixed"


def claims(final: pd.DataFrame) -> list[Claim]:
    """Test the three usual claims about RS and AC against :func:`final_per_run` rows.

    - "RS gives stronger privacy than AC": the smaller ``epsilon_max`` (worst seed) wins;
      equal values (relative difference under 1e-6) refute it, as equal
      ``(sigma, q, steps)`` must give.
    - "RS is faster than AC": ``seconds_per_round`` (server wall time per round).
    - "AC reaches better accuracy than RS": final test Dice (validation Dice when no test
      split was evaluated).

    Time and accuracy are compared per seed: RS and AC of one seed share the partition,
    the initial weights and, being run back to back, about the same machine load. A claim
    is confirmed or refuted only when the 95% Student-t interval of the paired difference
    ``AC - RS`` over at least two seeds excludes 0; otherwise it is ``undecided`` with the
    reason.
    """
    table = summarize(final)
    if table.empty:
        return []
    accuracy = "test_dice" if final["test_dice"].notna().any() else "val_dice"
    specs = [
        ("RS gives stronger privacy than AC", "epsilon_max", _privacy_verdict),
        ("RS is faster than AC", "seconds_per_round", _speed_verdict),
        ("AC reaches better accuracy than RS", accuracy, _accuracy_verdict),
    ]
    out = []
    for statement, metric, verdict in specs:
        verdicts = {}
        for key, group in final.groupby(["setup", "sweep_epsilon"], dropna=False, sort=False):
            label = key[0] if pd.isna(key[1]) else f"{key[0]}, target ε {key[1]:g}"
            by_method = {m: g.set_index("seed")[metric] for m, g in group.groupby("method")}
            if "rs" in by_method and "automatic" in by_method:
                verdicts[label] = verdict(by_method["rs"], by_method["automatic"], metric)
        out.append(Claim(statement, metric, _claim_table(table, metric), verdicts))
    return out


def claims_markdown(found: list[Claim]) -> str:
    """Render :func:`claims` as Markdown: per claim its table, verdict per group and overall."""
    parts = []
    for claim in found:
        parts.append(f"### \"{claim.statement}\": {claim.overall}\n")
        parts.append(_frame_markdown(claim.table))
        for label, verdict in claim.verdicts.items():
            parts.append(f"- {label}: {verdict}")
        parts.append("")
    return "\n".join(parts) + "\n"


def _privacy_verdict(rs: pd.Series, ac: pd.Series, metric: str) -> str:
    eps_rs, eps_ac = float(rs.max()), float(ac.max())
    if not (np.isfinite(eps_rs) and np.isfinite(eps_ac)):
        return "undecided: an epsilon is missing"
    if math.isclose(eps_rs, eps_ac, rel_tol=1e-6):
        return (
            f"refuted: equal epsilon ({eps_rs:.3f} vs {eps_ac:.3f}); the sparsification mask is "
            "data-independent, so equal (noise_multiplier, sample_rate, steps) give equal epsilon"
        )
    if eps_rs < eps_ac:
        return f"confirmed: epsilon {eps_rs:.3f} (RS) < {eps_ac:.3f} (AC)"
    return f"refuted: epsilon {eps_rs:.3f} (RS) > {eps_ac:.3f} (AC)"


def _speed_verdict(rs: pd.Series, ac: pd.Series, metric: str) -> str:
    # "RS is faster" means AC's time per round lies above RS's.
    return _paired_verdict(
        ac, rs, unit=" s", confirmed="RS is faster", refuted="RS is slower"
    )


def _accuracy_verdict(rs: pd.Series, ac: pd.Series, metric: str) -> str:
    return _paired_verdict(
        ac, rs, unit="", confirmed="AC is more accurate", refuted="RS is more accurate"
    )


def _paired_verdict(
    ac: pd.Series, rs: pd.Series, *, unit: str, confirmed: str, refuted: str
) -> str:
    """Decide the claim ``ac > rs`` from the 95% interval of ``ac - rs`` over shared seeds."""
    difference = (ac - rs).dropna()
    difference = difference[np.isfinite(difference)]
    n = len(difference)
    if n == 0:
        return "undecided: no seed has both values"
    ac_mean, rs_mean = float(ac[difference.index].mean()), float(rs[difference.index].mean())
    numbers = f"AC {ac_mean:.3f}{unit}, RS {rs_mean:.3f}{unit}"
    if n < 2:
        return f"undecided: too few seeds (n={n}, no interval); {numbers}"
    mean, half, _ = mean_ci(difference)
    interval = f"AC - RS = {mean:.3f} ± {half:.3f}{unit} over {n} seeds"
    if mean - half <= 0 <= mean + half:
        return (
            "undecided: the 95% interval of the paired difference contains 0 "
            f"({interval}; {numbers})"
        )
    if mean > 0:
        return f"confirmed: {confirmed} ({interval}; {numbers})"
    return f"refuted: {refuted} ({interval}; {numbers})"


def _claim_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = []
    for row in table.to_dict("records"):
        cells = {"method": METHOD_LABELS.get(row["method"], row["method"]), "setup": row["setup"]}
        if table["sweep_epsilon"].notna().any():
            eps = row["sweep_epsilon"]
            cells["target ε"] = "-" if pd.isna(eps) else f"{eps:g}"
        cells["seeds"] = row["seeds"]
        if metric == "epsilon_max":
            cells["noise_multiplier"] = f"{row['noise_multiplier']:.4g}"
            cells["max ε"] = _format_epsilon_max(row)
            sites = [c for c in table.columns if c.startswith("epsilon_site_")]
            cells["ε per site"] = _format_site_epsilons(row, sites)
        else:
            cells[_CLAIM_LABELS[metric]] = format_ci(
                row[f"{metric}_mean"], row[f"{metric}_ci95"], row["seeds"]
            )
        if metric == "test_dice":
            positives = row["test_dice_positive_mean"]
            cells["final test Dice (positives)"] = format_ci(positives, math.nan)
        if metric == "seconds_per_round":
            cells["site training s / round"] = format_ci(
                row["train_seconds_per_round_mean"], row["train_seconds_per_round_ci95"],
                row["seeds"],
            )
            cells["upload per run"] = format_bytes(row["upload_bytes_total_mean"])
        rows.append(cells)
    return pd.DataFrame(rows)


_CLAIM_LABELS = {
    "seconds_per_round": "round wall time (s)",
    "test_dice": "final test Dice",
    "val_dice": "final validation Dice",
}


def _frame_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no runs)\n"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    lines = [header, "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


# ----- helpers ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun that run") from None


def _normalise_keys(mapping: dict) -> dict:
    return {str(k).replace("-", "_"): v for k, v in mapping.items()}


def _single(series: pd.Series) -> str:
    values = sorted({str(v) for v in series.dropna()})
    return "/".join(values) if values else ""


def site_sort_key(site: str) -> tuple:
    """Order sites numerically when their ids are integers, else by name."""
    return (0, int(site), "") if str(site).isdigit() else (1, 0, str(site))


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "site":
        return column.map(lambda s: site_sort_key(s))
    return column
