"""Tables, claims and report rebuilding from hand-written run folders (common/results.py schema)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from common import results
from common.atomic import write_csv, write_json
from simulations import summary
from simulations.summary import METHOD_FOLDERS


def write_run(
    outputs,
    method,
    setup="iid",
    seed=0,
    sweep_epsilon=None,
    *,
    sites=2,
    rounds=3,
    dice=0.5,
    epsilon_step=1.0,
    round_seconds=10.0,
    upload_bytes=1000,
    complete=True,
):
    """Write one run folder as the server would; returns its path.

    Site ``s`` reports validation Dice ``dice + 0.01 * s`` in every round, test Dice
    ``dice + 0.01 * s + 0.1`` in the last round only, and cumulative epsilon
    ``epsilon_step * (s + 1) * r`` after round ``r``.
    """
    folder = outputs / METHOD_FOLDERS[method] / summary.run_name(setup, seed, sweep_epsilon)
    config = {"method": method, "seed": seed, "num-sites": sites, "num-server-rounds": rounds}
    write_json(folder / results.CONFIG_FILE, config)
    rows = []
    for r in range(1, rounds + 1):
        for s in range(sites):
            last = r == rounds
            private = method != "none"
            rows.append(
                {
                    "server_round": r,
                    "site": s,
                    "status": results.STATUS_OK,
                    "reason": "",
                    "method": method,
                    "num_examples": 10,
                    "train_loss": 0.5,
                    "steps": 4,
                    "noise_multiplier": 1.0 if private else 0.0,
                    "sample_rate": 0.2,
                    "epsilon": epsilon_step * (s + 1) * r if private else math.nan,
                    "epsilon_server": epsilon_step * (s + 1) * r if private else math.nan,
                    "accountant": "rdp",
                    "delta": 1e-5,
                    "upload_bytes": upload_bytes,
                    "train_seconds": round_seconds / 2,
                    "round_seconds": round_seconds,
                    "val_dice": dice + 0.01 * s,
                    "val_dice_positive": dice,
                    "val_iou": dice / 2,
                    "val_fpr": 0.1,
                    "test_dice": dice + 0.01 * s + 0.1 if last else math.nan,
                    "test_dice_positive": dice if last else math.nan,
                    "test_iou": dice / 2 if last else math.nan,
                    "test_fpr": 0.2 if last else math.nan,
                }
            )
    write_csv(folder / results.ROUNDS_FILE, pd.DataFrame(rows, columns=results.ROUND_COLUMNS))
    status = {"complete": complete, "last_round": rounds, "stop_reason": "" if complete else "x"}
    write_json(folder / results.STATUS_FILE, status)
    return folder


def test_run_name_round_trips():
    for setup, seed, eps in [("iid", 0, None), ("label-skew", 12, 4.0), ("scanner-shift", 1, 0.5)]:
        assert summary.parse_run_name(summary.run_name(setup, seed, eps)) == (setup, seed, eps)


def test_run_name_rejects_foreign_folder():
    with pytest.raises(ValueError, match="'notes' is not <setup>-seed<k>"):
        summary.parse_run_name("notes")


def test_mean_ci_matches_t_interval():
    mean, half, n = summary.mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653; s = 1; half = 4.302653 / sqrt(3).
    assert mean == 2.0
    assert n == 3
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_mean_ci_one_value_has_no_interval():
    mean, half, n = summary.mean_ci([0.7, math.nan])
    assert (mean, n) == (0.7, 1)
    assert math.isnan(half)


def test_final_per_run_values(tmp_path):
    write_run(tmp_path, "rs", sites=3, rounds=2, dice=0.4, epsilon_step=0.5, round_seconds=7.0)
    final = summary.final_per_run(summary.load_outputs(tmp_path))
    assert len(final) == 1
    row = final.iloc[0]
    assert row["val_dice"] == pytest.approx(0.41)  # mean of 0.40, 0.41, 0.42
    assert row["test_dice"] == pytest.approx(0.51)
    assert row["epsilon_site_0"] == pytest.approx(1.0)  # 0.5 * 1 * 2 rounds
    assert row["epsilon_site_2"] == pytest.approx(3.0)
    assert row["epsilon_max"] == pytest.approx(3.0)
    assert row["upload_bytes_total"] == 1000 * 3 * 2
    assert row["wall_seconds"] == pytest.approx(14.0)
    assert row["seconds_per_round"] == pytest.approx(7.0)
    assert row["rounds"] == 2


def test_epsilon_never_below_server_or_site(tmp_path):
    folder = write_run(tmp_path, "automatic", sites=1, rounds=2)
    rounds = pd.read_csv(folder / results.ROUNDS_FILE)
    rounds.loc[0, "epsilon_server"] = 5.0  # the server recomputed more than the site reported
    rounds.loc[1, "epsilon"] = 9.0  # the site reported more than the server recomputed
    write_csv(folder / results.ROUNDS_FILE, rounds)
    loaded = summary.load_outputs(tmp_path)
    assert loaded["epsilon_site"].tolist() == [5.0, 9.0]


def test_skipped_round_carries_epsilon(tmp_path):
    folder = write_run(tmp_path, "rs", sites=1, rounds=3)
    rounds = pd.read_csv(folder / results.ROUNDS_FILE)
    rounds.loc[2, ["status", "epsilon", "epsilon_server"]] = [results.STATUS_NOT_SAMPLED, None, None]
    write_csv(folder / results.ROUNDS_FILE, rounds)
    loaded = summary.load_outputs(tmp_path)
    assert loaded["epsilon_site"].tolist() == [1.0, 2.0, 2.0]


def test_unfinished_run_left_out(tmp_path, caplog):
    write_run(tmp_path, "rs", seed=0)
    write_run(tmp_path, "rs", seed=1, complete=False)
    loaded = summary.load_outputs(tmp_path)
    assert sorted(loaded["seed"].unique()) == [0]
    assert "unfinished run(s) left out" in caplog.text
    assert "iid-seed1" in caplog.text


def test_run_in_wrong_method_folder_raises(tmp_path):
    folder = write_run(tmp_path, "rs")
    write_json(folder / results.CONFIG_FILE, {"method": "automatic"})
    with pytest.raises(ValueError, match="names method 'automatic'.*automatic_clipping"):
        summary.find_runs(tmp_path)


def test_summary_rows_and_columns(tmp_path):
    for seed, dice in enumerate([0.4, 0.5, 0.6]):
        write_run(tmp_path, "rs", seed=seed, dice=dice)
        write_run(tmp_path, "automatic", seed=seed, dice=dice + 0.2)
    write_run(tmp_path, "none", seed=0, dice=0.9)
    table = summary.summarize(summary.final_per_run(summary.load_outputs(tmp_path)))
    assert table["method"].tolist() == ["rs", "automatic", "none"]
    assert table["seeds"].tolist() == [3, 3, 1]
    rs = table.iloc[0]
    assert rs["test_dice_mean"] == pytest.approx(0.605)  # mean(0.4..0.6) + 0.005 + 0.1
    assert rs["test_dice_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert rs["epsilon_site_0"] == pytest.approx(3.0)
    assert rs["epsilon_site_1"] == pytest.approx(6.0)
    assert rs["epsilon_max"] == pytest.approx(6.0)
    assert math.isnan(table.iloc[2]["test_dice_ci95"])
    for column in ("accountant", "delta", "wall_seconds_mean", "upload_bytes_total_mean"):
        assert column in table.columns


def test_summary_markdown_cells(tmp_path):
    write_run(tmp_path, "rs", seed=0, dice=0.4)
    write_run(tmp_path, "rs", seed=1, dice=0.6)
    write_run(tmp_path, "none", seed=0, dice=0.9)
    table = summary.summarize(summary.final_per_run(summary.load_outputs(tmp_path)))
    text = summary.summary_markdown(table)
    rs_line = next(line for line in text.splitlines() if line.startswith("| RS"))
    none_line = next(line for line in text.splitlines() if line.startswith("| non-private"))
    assert "0.605 ± " in rs_line
    assert "0: 3.00, 1: 6.00" in rs_line
    assert "6.00 (rdp, δ=1e-05)" in rs_line
    assert "1.0 (n=1)" not in rs_line
    assert "1.005 (n=1)" in none_line  # 0.9 + 0.005 + 0.1
    assert "∞" in none_line


def _claims_for(tmp_path, rs_dice, ac_dice, rs_time=10.0, ac_time=10.0, rs_step=1.0, ac_step=1.0):
    for seed, (a, b) in enumerate(zip(rs_dice, ac_dice)):
        write_run(tmp_path, "rs", seed=seed, dice=a, round_seconds=rs_time + seed * 0.1,
                  epsilon_step=rs_step)
        write_run(tmp_path, "automatic", seed=seed, dice=b, round_seconds=ac_time + seed * 0.1,
                  epsilon_step=ac_step)
    final = summary.final_per_run(summary.load_outputs(tmp_path))
    return {c.statement: c for c in summary.claims(final)}


def test_claims_equal_epsilon_refutes_privacy(tmp_path):
    found = _claims_for(tmp_path, [0.4, 0.5], [0.4, 0.5])
    privacy = found["RS gives stronger privacy than AC"]
    assert privacy.overall == "refuted"
    assert "equal epsilon" in privacy.verdicts["iid"]


def test_claims_lower_rs_epsilon_confirms_privacy(tmp_path):
    found = _claims_for(tmp_path, [0.4, 0.5], [0.4, 0.5], rs_step=0.5)
    assert found["RS gives stronger privacy than AC"].overall == "confirmed"


def test_claims_disjoint_intervals_decide(tmp_path):
    found = _claims_for(
        tmp_path, [0.30, 0.31, 0.32], [0.60, 0.61, 0.62], rs_time=5.0, ac_time=20.0
    )
    assert found["AC reaches better accuracy than RS"].overall == "confirmed"
    assert found["RS is faster than AC"].overall == "confirmed"


def test_claims_opposite_direction_refutes(tmp_path):
    found = _claims_for(
        tmp_path, [0.60, 0.61, 0.62], [0.30, 0.31, 0.32], rs_time=20.0, ac_time=5.0
    )
    assert found["AC reaches better accuracy than RS"].overall == "refuted"
    assert found["RS is faster than AC"].overall == "refuted"


def test_claims_paired_interval_with_zero_undecided(tmp_path):
    found = _claims_for(tmp_path, [0.3, 0.7, 0.5], [0.4, 0.6, 0.55])
    verdict = found["AC reaches better accuracy than RS"].verdicts["iid"]
    assert verdict.startswith("undecided: the 95% interval of the paired difference contains 0")
    assert "AC - RS = 0.017 ± " in verdict


def test_claims_pair_seeds(tmp_path):
    # The seeds differ a lot, but AC beats RS by 0.05 in each: the paired test decides.
    found = _claims_for(tmp_path, [0.1, 0.5, 0.9], [0.15, 0.55, 0.95])
    verdict = found["AC reaches better accuracy than RS"].verdicts["iid"]
    assert verdict.startswith("confirmed: AC is more accurate (AC - RS = 0.050 ± 0.000")


def test_claims_one_seed_is_undecided(tmp_path):
    found = _claims_for(tmp_path, [0.1], [0.9], rs_time=1.0, ac_time=50.0)
    for statement in ("AC reaches better accuracy than RS", "RS is faster than AC"):
        assert found[statement].verdicts["iid"].startswith("undecided: too few seeds (n=1")


def test_claims_markdown_lists_tables_and_verdicts(tmp_path):
    found = _claims_for(tmp_path, [0.4, 0.5], [0.4, 0.5])
    text = summary.claims_markdown(list(found.values()))
    assert '### "RS gives stronger privacy than AC": refuted' in text
    assert "| method | setup | seeds | noise_multiplier | max ε | ε per site |" in text
    assert (
        "| method | setup | seeds | round wall time (s) | site training s / round | "
        "upload per run |" in text
    )
    assert "| method | setup | seeds | final test Dice |" in text


@pytest.mark.slow
def test_report_rebuilds_tables_and_plots(tmp_path):
    from PIL import Image

    from simulations.compare import write_report

    for seed in (0, 1):
        for eps in (1.0, 4.0):
            write_run(tmp_path, "rs", seed=seed, sweep_epsilon=eps, dice=0.3 + eps / 20)
            write_run(tmp_path, "automatic", seed=seed, sweep_epsilon=eps, dice=0.35 + eps / 20)
    write_run(tmp_path, "none", seed=0, dice=0.8)
    written = write_report(tmp_path)
    folder = tmp_path / summary.COMPARISON_DIR
    names = {p.name for p in written}
    assert names == {
        "accuracy_comparison.png",
        "privacy_comparison.png",
        "per_site_dice.png",
        "communication.png",
        "round_time.png",
        "privacy_utility.png",
        "summary.csv",
        "summary.md",
    }
    for path in written:
        assert path.parent == folder
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.format == "PNG"
                assert image.width > 100
                assert image.height > 100
    table = pd.read_csv(folder / summary.SUMMARY_CSV)
    assert len(table) == 5  # rs and automatic at two target epsilons, plus non-private
    assert sorted(table["sweep_epsilon"].dropna().unique()) == [1.0, 4.0]
    text = (folder / summary.SUMMARY_MD).read_text()
    assert "| target ε |" in text
    assert "RS gives stronger privacy than AC" in text


def test_report_without_sweep_has_no_privacy_utility(tmp_path):
    from simulations.compare import write_report

    write_run(tmp_path, "rs")
    write_run(tmp_path, "automatic")
    names = {p.name for p in write_report(tmp_path)}
    assert "privacy_utility.png" not in names
    assert "accuracy_comparison.png" in names


def test_report_cli_on_empty_folder_fails(tmp_path):
    from simulations.cli import main

    assert main(["report", str(tmp_path)]) == 1


def test_summary_csv_round_trips_sites(tmp_path):
    write_run(tmp_path, "rs", sites=3)
    table = summary.summarize(summary.final_per_run(summary.load_outputs(tmp_path)))
    site_columns = [c for c in table.columns if c.startswith("epsilon_site_")]
    assert site_columns == ["epsilon_site_0", "epsilon_site_1", "epsilon_site_2"]
    assert np.allclose(table[site_columns].iloc[0].to_numpy(dtype=float), [3.0, 6.0, 9.0])
    assert json.loads(json.dumps(table.to_dict("records"), default=str))


def test_report_command_prints_summary(tmp_path, capsys):
    """`dpfedseg report` (and `compare` after its runs) prints the table and claims, then the files."""
    from simulations.cli import main

    write_run(tmp_path, "rs")
    write_run(tmp_path, "automatic")
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    folder = tmp_path / summary.COMPARISON_DIR
    assert lines[0] == "# RS vs AC comparison: summary"
    assert lines[2].startswith("| method | setup | seeds | val Dice | test Dice |")
    assert lines[4].startswith("| RS (random sparsification) | iid | 1 | 0.505 (n=1) |")
    assert '### "RS gives stronger privacy than AC": refuted' in lines
    assert "## Figures" not in lines
    written = lines[lines.index("files written:") + 1 :]
    assert f"  {folder / summary.SUMMARY_MD}" in written
    assert f"  {folder / summary.SUMMARY_CSV}" in written
    assert len(written) == 7  # five figures, the CSV and the Markdown summary


def test_summary_names_runs_stopped_early(tmp_path):
    """A run the server ended before its planned rounds is listed with its reason."""
    from simulations.compare import write_report

    write_run(tmp_path, "automatic")
    stopped = write_run(tmp_path, "rs", rounds=1)
    write_json(stopped / results.CONFIG_FILE, {"method": "rs", "seed": 0, "num-sites": 2, "num-server-rounds": 3})
    reason = "every site's privacy budget is spent"
    write_json(stopped / results.STATUS_FILE, {"complete": True, "last_round": 1, "stop_reason": reason})
    write_report(tmp_path)
    text = (tmp_path / summary.COMPARISON_DIR / summary.SUMMARY_MD).read_text()
    section = text.split("## Runs stopped early\n")[1].split("## Claims")[0]
    assert section.strip().splitlines() == [f"- RS (random sparsification), iid-seed0: 1 of 3 rounds ({reason})"]
