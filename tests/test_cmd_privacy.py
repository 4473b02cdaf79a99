"""``dpfedseg privacy``: the printed epsilons and noise multipliers are the library's values."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from common.privacy.accounting import ACCOUNTANT_LABELS, calibrate_noise_multiplier, compute_epsilon
from common.privacy.ledger import LedgerEntry
from simulations.cli import main
from simulations.cmd_privacy import round_up

DELTA = 1e-5
MECHANISM = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo ``main``'s logging setup, whose root handler writes to this test's captured stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    showwarning, filters = warnings.showwarning, list(warnings.filters)
    for handler in handlers:
        if getattr(handler, "_dpfedseg", False):
            root.removeHandler(handler)
    yield
    root.handlers[:] = [h for h in handlers if not getattr(h, "_dpfedseg", False)]
    root.setLevel(level)
    warnings.showwarning = showwarning
    warnings.filters[:] = filters


def table_rows(output: str) -> dict[str, tuple[str, str]]:
    """Map accountant name to (epsilon text, label) from the printed table."""
    lines = output.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("accountant")))
    rows = {}
    for line in lines[header + 1 :]:
        name, epsilon, label = line.split(maxsplit=2)
        rows[name] = (epsilon, label)
    return rows


def test_epsilon_table_matches_accountants(capsys):
    assert main(["privacy", *MECHANISM, "--noise-multiplier", "1.0"]) == 0
    output = capsys.readouterr().out
    rows = table_rows(output)
    entries = [LedgerEntry(1.0, 0.01, 1000)]
    assert list(rows) == ["rdp", "prv", "pld"]
    for name, (epsilon, label) in rows.items():
        expected = compute_epsilon(entries, delta=DELTA, accountant=name)
        assert epsilon == f"{round_up(expected):.4f}", name
        assert label == ACCOUNTANT_LABELS[name]
    assert rows["rdp"][0] == "2.1014"
    assert "noise_multiplier 1.0000, sample_rate 0.01, steps 1000, delta 1e-05" in output


def test_json_output_is_unrounded(capsys):
    assert main(["privacy", *MECHANISM, "--noise-multiplier", "1.0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    entries = [LedgerEntry(1.0, 0.01, 1000)]
    assert result["noise_multiplier"] == 1.0
    assert result["calibration_accountant"] is None
    for row in result["epsilons"]:
        expected = compute_epsilon(entries, delta=DELTA, accountant=row["accountant"])
        assert row["epsilon"] == expected
        assert row["delta"] == DELTA


def test_target_epsilon_prints_calibrated_sigma(capsys):
    assert main(["privacy", *MECHANISM, "--target-epsilon", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, delta=DELTA, sample_rate=0.01, steps=1000)
    assert result["noise_multiplier"] == sigma
    assert result["calibration_accountant"] == "rdp"
    epsilons = {row["accountant"]: row["epsilon"] for row in result["epsilons"]}
    assert epsilons["rdp"] <= 8.0
    assert epsilons["pld"] <= epsilons["rdp"]


def test_calibrated_sigma_rounds_up():
    result = {
        "noise_multiplier": 0.61751,
        "sample_rate": 0.01,
        "steps": 1000,
        "delta": DELTA,
        "target_epsilon": 8.0,
        "calibration_accountant": "rdp",
        "epsilons": [{"accountant": "rdp", "label": "RDP", "epsilon": 7.90001, "delta": DELTA}],
    }
    from simulations.cmd_privacy import format_result

    text = format_result(result)
    assert "calibrated noise_multiplier 0.6176 keeps epsilon <= 8 (rdp accountant)" in text
    assert table_rows(text)["rdp"][0] == "7.9001"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--noise-multiplier", "1.0", "--target-epsilon", "8"], "give exactly one of"),
        ([], "give exactly one of"),
    ],
)
def test_noise_and_target_are_exclusive(capsys, arguments, message):
    assert main(["privacy", *MECHANISM, *arguments]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--sample-rate", "nan", "--sample-rate must lie in (0.0, 1.0]; got nan"),
        ("--sample-rate", "0", "--sample-rate must lie in (0.0, 1.0]; got 0.0"),
        ("--sample-rate", "1.5", "--sample-rate must lie in (0.0, 1.0]; got 1.5"),
        ("--sample-rate", "-0.1", "--sample-rate must lie in (0.0, 1.0]; got -0.1"),
        ("--noise-multiplier", "nan", "--noise-multiplier must lie in (0.0, inf); got nan"),
        ("--noise-multiplier", "inf", "--noise-multiplier must lie in (0.0, inf); got inf"),
        ("--noise-multiplier", "0", "--noise-multiplier must lie in (0.0, inf); got 0.0"),
        ("--delta", "nan", "--delta must lie in (0.0, 1.0); got nan"),
        ("--delta", "1", "--delta must lie in (0.0, 1.0); got 1.0"),
        ("--steps", "-1", "--steps must lie in [0, inf); got -1"),
        ("--tolerance", "nan", "--tolerance must lie in (0.0, 0.5); got nan"),
        ("--tolerance", "0.5", "--tolerance must lie in (0.0, 0.5); got 0.5"),
    ],
)
def test_invalid_flag_named_with_value(capsys, flag, value, message):
    arguments = ["privacy", *MECHANISM, "--noise-multiplier", "1.0", flag, value]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "--target-epsilon must lie in (0.0, inf); got nan"),
        ("inf", "--target-epsilon must lie in (0.0, inf); got inf"),
        ("0", "--target-epsilon must lie in (0.0, inf); got 0.0"),
    ],
)
def test_invalid_target_epsilon_named(capsys, value, message):
    assert main(["privacy", *MECHANISM, "--target-epsilon", value]) == 1
    assert message in capsys.readouterr().err


def test_calibration_needs_one_step(capsys):
    assert main(["privacy", *MECHANISM, "--target-epsilon", "8", "--steps", "0"]) == 1
    assert "--steps must lie in [1, inf); got 0" in capsys.readouterr().err


def test_failed_accountant_keeps_other_rows(capsys, monkeypatch):
    """PRV out of memory (a tiny sigma or very many steps) still prints RDP and PLD, then fails."""
    from common.privacy import accounting

    def out_of_memory(composition, delta):
        raise MemoryError("Unable to allocate 455. GiB for an array")

    monkeypatch.setitem(accounting._ACCOUNTANT_FUNCTIONS, "prv", out_of_memory)
    arguments = ["--sample-rate", "0.03", "--noise-multiplier", "1.1", "--steps", "123", "--delta", "1e-5"]
    assert main(["privacy", *arguments]) == 1
    text = capsys.readouterr().out
    table, reasons = text.split("\n\n")[1:]
    rows = table_rows(table)
    entry = LedgerEntry(noise_multiplier=1.1, sample_rate=0.03, steps=123)
    rdp = compute_epsilon([entry], delta=1e-5, accountant="rdp")
    assert rows["rdp"][0] == f"{round_up(rdp):.4f}"
    assert rows["prv"][0] == "failed"
    assert rows["pld"][0] != "failed"
    assert reasons.startswith("prv failed: the prv accountant failed on")
    assert "Unable to allocate 455. GiB" in reasons

    assert main(["privacy", *arguments, "--json"]) == 1
    rows = {row["accountant"]: row for row in json.loads(capsys.readouterr().out)["epsilons"]}
    assert rows["prv"]["epsilon"] is None
    assert rows["rdp"]["epsilon"] == pytest.approx(rdp, rel=1e-12)
    assert rows["pld"]["error"] is None
