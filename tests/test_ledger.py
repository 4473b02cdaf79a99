"""The per-site privacy ledger: entries, persistence across processes, budget enforcement."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy.accounting import compute_epsilon
from common.privacy.ledger import LEDGER_FORMAT, LedgerEntry, PrivacyLedger
from common.runtime import project_root

DELTA = 1e-5


def round_entry(server_round: int, steps: int = 100) -> LedgerEntry:
    return LedgerEntry(1.0, 0.01, steps, server_round=server_round, method="rs")


# ----- LedgerEntry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("noise_multiplier", 0.0, "'noise_multiplier' must be a positive finite number, got 0.0"),
        ("noise_multiplier", -1.0, "'noise_multiplier' must be a positive finite number"),
        ("noise_multiplier", float("nan"), "'noise_multiplier' must be a positive finite number"),
        ("noise_multiplier", float("inf"), "'noise_multiplier' must be a positive finite number"),
        ("noise_multiplier", "1.0", "'noise_multiplier' must be a number, got '1.0'"),
        ("noise_multiplier", True, "'noise_multiplier' must be a number, got True"),
        ("sample_rate", 0.0, r"'sample_rate' must lie in \(0, 1\], got 0.0"),
        ("sample_rate", 1.5, r"'sample_rate' must lie in \(0, 1\], got 1.5"),
        ("steps", -1, "'steps' must be >= 0, got -1"),
        ("steps", 1.5, "'steps' must be an integer, got 1.5"),
        ("steps", True, "'steps' must be an integer, got True"),
        ("server_round", 0, "'server_round' must be a 1-based round or None, got 0"),
        ("server_round", "2", "'server_round' must be an integer"),
        ("method", "none", "'method' must be one of flat, automatic"),
        ("method", "bogus", "got 'bogus'"),
    ],
)
def test_entry_rejects_bad_field(field, value, message):
    fields = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, field: value}
    with pytest.raises(ValueError, match=message):
        LedgerEntry(**fields)


def test_entry_normalises_number_types():
    entry = LedgerEntry(np.float64(1.5), np.float32(0.25), 3.0, server_round=np.int64(2))
    assert entry == LedgerEntry(1.5, 0.25, 3, server_round=2)
    assert type(entry.noise_multiplier) is float
    assert type(entry.steps) is int
    assert type(entry.server_round) is int


def test_entry_dict_round_trip():
    entry = LedgerEntry(1.1, 0.02, 50, server_round=4, method="rs-automatic")
    data = entry.to_dict()
    assert data == {
        "noise_multiplier": 1.1,
        "sample_rate": 0.02,
        "steps": 50,
        "server_round": 4,
        "method": "rs-automatic",
    }
    assert LedgerEntry.from_dict(json.loads(json.dumps(data))) == entry
    assert LedgerEntry.from_dict({"noise_multiplier": 1, "sample_rate": 1, "steps": 0}) == LedgerEntry(
        1.0, 1.0, 0
    )


def test_entry_from_dict_names_bad_field():
    with pytest.raises(ValueError, match="unknown field.*'sigma'.*valid fields: noise_multiplier"):
        LedgerEntry.from_dict({"sigma": 1.0, "sample_rate": 0.01, "steps": 1})
    with pytest.raises(ValueError, match="is missing field.*steps"):
        LedgerEntry.from_dict({"noise_multiplier": 1.0, "sample_rate": 0.01})
    with pytest.raises(ValueError, match="must be a mapping"):
        LedgerEntry.from_dict([1.0, 0.01, 1])


# ----- In-memory ledger and budget ----------------------------------------------------------


def test_memory_ledger_epsilon_composes_all_entries():
    ledger = PrivacyLedger(None, delta=DELTA)
    assert ledger.epsilon() == 0.0
    ledger.record([round_entry(1)])
    ledger.record([round_entry(2), round_entry(3)])
    assert ledger.entries == (round_entry(1), round_entry(2), round_entry(3))
    assert ledger.epsilon() == compute_epsilon([LedgerEntry(1.0, 0.01, 300)], delta=DELTA)
    extra = [round_entry(4)]
    assert ledger.epsilon(extra=extra) == compute_epsilon([LedgerEntry(1.0, 0.01, 400)], delta=DELTA)
    assert len(ledger.entries) == 3


def test_check_budget_rejects_with_reason():
    ledger = PrivacyLedger(None, delta=DELTA, target_epsilon=1.3)
    ledger.record([round_entry(1)])
    current = ledger.epsilon()
    assert ledger.check_budget([round_entry(2, steps=10)]) is None
    planned = [round_entry(2, steps=900)]
    reason = ledger.check_budget(planned)
    reached = ledger.epsilon(extra=planned)
    assert reached > 1.3
    assert reason is not None
    assert "round rejected: 900 more DP-SGD steps" in reason
    assert f"from {current:.4f} to {reached:.4f}" in reason
    assert "target epsilon 1.3" in reason
    assert "rdp accountant, delta 1e-05" in reason


def test_check_budget_uses_requested_accountant():
    # PRV is tighter than RDP, so one plan can fit the budget under PRV only.
    entries = [LedgerEntry(1.0, 0.01, 1000)]
    rdp = compute_epsilon(entries, delta=DELTA, accountant="rdp")
    prv = compute_epsilon(entries, delta=DELTA, accountant="prv")
    target = (rdp + prv) / 2
    assert PrivacyLedger(None, delta=DELTA, target_epsilon=target).check_budget(entries, accountant="prv") is None
    reason = PrivacyLedger(None, delta=DELTA, target_epsilon=target).check_budget(entries, accountant="rdp")
    assert reason is not None and "rdp accountant" in reason


def test_ledger_without_target_never_rejects():
    ledger = PrivacyLedger(None, delta=DELTA)
    assert ledger.check_budget([LedgerEntry(0.5, 0.5, 10_000)]) is None


@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=10.0),
    plan=st.lists(
        st.tuples(
            st.sampled_from([0.7, 1.0, 1.5, 3.0]),
            st.sampled_from([0.005, 0.02, 0.1]),
            st.integers(min_value=0, max_value=400),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_checked_plan_never_exceeds_budget(target, plan):
    ledger = PrivacyLedger(None, delta=DELTA, target_epsilon=target)
    for server_round, (sigma, sample_rate, steps) in enumerate(plan, start=1):
        planned = [LedgerEntry(sigma, sample_rate, steps, server_round=server_round)]
        before = ledger.entries
        if ledger.check_budget(planned) is None:
            ledger.record(planned)
        else:
            assert ledger.entries == before
        assert ledger.epsilon() <= target
    assert compute_epsilon(ledger.entries, delta=DELTA) <= target


def test_record_rejects_non_entries():
    ledger = PrivacyLedger(None, delta=DELTA)
    with pytest.raises(TypeError, match="LedgerEntry.from_dict"):
        ledger.record([{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1}])


# ----- Persistence -------------------------------------------------------------------------


def test_file_ledger_survives_reopen(tmp_path):
    path = tmp_path / "site-0" / "privacy_ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA, target_epsilon=8.0)
    ledger.record([round_entry(1)])
    ledger.record([round_entry(2)])
    reopened = PrivacyLedger(path, delta=DELTA)
    assert reopened.entries == (round_entry(1), round_entry(2))
    assert reopened.target_epsilon == 8.0
    assert reopened.epsilon() == ledger.epsilon()
    data = json.loads(path.read_text())
    assert data["format"] == LEDGER_FORMAT
    assert data["format_version"] == 1
    assert data["delta"] == DELTA
    assert data["target_epsilon"] == 8.0
    assert data["entries"] == [round_entry(1).to_dict(), round_entry(2).to_dict()]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project_root(),
    )


def test_repeated_runs_in_new_processes_append(tmp_path):
    path = tmp_path / "ledger.json"
    run = """
        import sys
        from common.privacy.ledger import LedgerEntry, PrivacyLedger
        ledger = PrivacyLedger(sys.argv[1], delta=1e-5, target_epsilon=8.0)
        start = len(ledger.entries) + 1
        ledger.record([LedgerEntry(1.0, 0.01, 100, server_round=start, method="rs")])
        print(len(ledger.entries))
    """
    outputs = []
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(run), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=project_root(),
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.strip())
    assert outputs == ["1", "2", "3"]
    ledger = PrivacyLedger(path, delta=DELTA)
    assert ledger.entries == (round_entry(1), round_entry(2), round_entry(3))
    result = run_python(
        f"""
        from common.privacy.ledger import PrivacyLedger
        print(repr(PrivacyLedger({str(path)!r}, delta=1e-5).epsilon("rdp")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == ledger.epsilon()


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA)
    ledger.record([round_entry(1)])
    before = path.read_bytes()

    def fail_replace(source, destination):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="simulated"):
        ledger.record([round_entry(2)])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    assert ledger.entries == (round_entry(1),)
    assert PrivacyLedger(path, delta=DELTA).entries == (round_entry(1),)


def test_two_writers_keep_both_entries(tmp_path, caplog):
    path = tmp_path / "ledger.json"
    first = PrivacyLedger(path, delta=DELTA)
    second = PrivacyLedger(path, delta=DELTA)
    first.record([round_entry(1)])
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        second.record([round_entry(2)])
    assert "gained 1 entries from another process" in caplog.text
    assert second.entries == (round_entry(1), round_entry(2))
    assert PrivacyLedger(path, delta=DELTA).entries == (round_entry(1), round_entry(2))


def test_edited_file_blocks_record(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA)
    ledger.record([round_entry(1), round_entry(2)])
    data = json.loads(path.read_text())
    data["entries"] = data["entries"][:1]
    path.write_text(json.dumps(data))
    edited = path.read_bytes()
    with pytest.raises(RuntimeError, match="no longer starts with the 2 entries"):
        ledger.record([round_entry(3)])
    assert path.read_bytes() == edited


def test_deleted_file_is_written_back(tmp_path, caplog):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA)
    ledger.record([round_entry(1)])
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="common.privacy.ledger"):
        ledger.record([round_entry(2)])
    assert "was deleted since it was loaded" in caplog.text
    assert PrivacyLedger(path, delta=DELTA).entries == (round_entry(1), round_entry(2))


def test_delta_mismatch_names_both_values(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, delta=1e-5).record([round_entry(1)])
    with pytest.raises(ValueError, match=r"written with delta 1e-05, but delta 1e-06 was requested"):
        PrivacyLedger(path, delta=1e-6)


def test_target_handling_on_reopen(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, delta=DELTA, target_epsilon=8.0).record([round_entry(1)])
    assert PrivacyLedger(path, delta=DELTA).target_epsilon == 8.0
    assert PrivacyLedger(path, delta=DELTA, target_epsilon=8.0).target_epsilon == 8.0
    with pytest.raises(ValueError, match="has target epsilon 8.0, but 10.0 was requested"):
        PrivacyLedger(path, delta=DELTA, target_epsilon=10.0)
    open_ended = tmp_path / "open.json"
    PrivacyLedger(open_ended, delta=DELTA).record([round_entry(1)])
    assert PrivacyLedger(open_ended, delta=DELTA, target_epsilon=4.0).target_epsilon == 4.0


def test_first_check_fixes_accountant(tmp_path):
    """Switching accountants between runs could pass the target under the first one: rejected."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, delta=DELTA, target_epsilon=8.0)
    assert ledger.check_budget([round_entry(1)], accountant="pld") is None
    ledger.record([round_entry(1)])
    assert json.loads(path.read_text())["accountant"] == "pld"
    assert PrivacyLedger(path, delta=DELTA).budget_accountant == "pld"
    with pytest.raises(ValueError, match="under the pld accountant, but the rdp accountant was requested"):
        PrivacyLedger(path, delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="use accountant pld for this site"):
        PrivacyLedger(path, delta=DELTA).check_budget([round_entry(2)], accountant="rdp")
    assert PrivacyLedger(path, delta=DELTA).epsilon("rdp") > 0  # reporting under another accountant stays open


def test_record_keeps_first_accountant(tmp_path, caplog):
    """Two ledger objects on one file, checked under different accountants: the first stays fixed."""
    path = tmp_path / "ledger.json"
    first = PrivacyLedger(path, delta=DELTA, target_epsilon=8.0)
    second = PrivacyLedger(path, delta=DELTA, target_epsilon=8.0)
    assert first.check_budget([round_entry(1)], accountant="pld") is None
    assert second.check_budget([round_entry(2)], accountant="rdp") is None
    first.record([round_entry(1)])
    second.record([round_entry(2)])
    assert "recording its steps and keeping pld" in caplog.text
    assert json.loads(path.read_text())["accountant"] == "pld"
    assert len(json.loads(path.read_text())["entries"]) == 2
    with pytest.raises(ValueError, match="under the pld accountant"):
        second.check_budget([round_entry(3)], accountant="rdp")


def test_accountant_of_older_or_open_ledger(tmp_path):
    """A file without the field takes its next check's accountant; without a target nothing is fixed."""
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, delta=DELTA, target_epsilon=8.0).record([round_entry(1)])
    data = json.loads(path.read_text())
    assert data.pop("accountant") is None  # recorded before any check
    path.write_text(json.dumps(data))
    ledger = PrivacyLedger(path, delta=DELTA, accountant="prv")
    assert ledger.check_budget([round_entry(2)], accountant="prv") is None
    ledger.record([round_entry(2)])
    assert PrivacyLedger(path, delta=DELTA).budget_accountant == "prv"
    open_ended = PrivacyLedger(tmp_path / "open.json", delta=DELTA)
    assert open_ended.check_budget([round_entry(1)], accountant="pld") is None
    assert open_ended.budget_accountant is None


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "dpfedseg-privacy-ledger", "format_version": 1, "del', "invalid JSON"),
        ("[]", "not a dpfedseg privacy ledger"),
        ('{"format": "something-else"}', "not a dpfedseg privacy ledger"),
        (
            '{"format": "dpfedseg-privacy-ledger", "format_version": 0, "delta": 1e-5, '
            '"target_epsilon": null, "entries": []}',
            "invalid format_version 0",
        ),
        (
            '{"format": "dpfedseg-privacy-ledger", "format_version": 1, "delta": 2, '
            '"target_epsilon": null, "entries": []}',
            r"'delta' must be a number in \(0, 1\), got 2",
        ),
        (
            '{"format": "dpfedseg-privacy-ledger", "format_version": 1, "delta": 1e-5, '
            '"target_epsilon": null, "entries": {}}',
            "'entries' must be a list",
        ),
        (
            '{"format": "dpfedseg-privacy-ledger", "format_version": 1, "delta": 1e-5, '
            '"target_epsilon": 8.0, "accountant": "gdp", "entries": []}',
            "'accountant' must be one of rdp, prv, pld or null, got 'gdp'",
        ),
        (
            '{"format": "dpfedseg-privacy-ledger", "format_version": 1, "delta": 1e-5, '
            '"target_epsilon": null, "entries": [{"noise_multiplier": 1.0, "sample_rate": 0.01, '
            '"steps": 1}, {"noise_multiplier": 0, "sample_rate": 0.01, "steps": 1}]}',
            "entry 1: ledger entry field 'noise_multiplier' must be a positive finite number",
        ),
    ],
)
def test_corrupted_file_names_file_and_fix(tmp_path, content, message):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        PrivacyLedger(path, delta=DELTA)
    assert str(path) in str(raised.value)
    assert "Restore it from a backup" in str(raised.value)


def test_newer_format_asks_for_upgrade(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(
        '{"format": "dpfedseg-privacy-ledger", "format_version": 2, "delta": 1e-5, "entries": []}'
    )
    with pytest.raises(ValueError, match="format_version 2, newer than the 1.*upgrade dpfedseg"):
        PrivacyLedger(path, delta=DELTA)


def test_ledger_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="delta must lie in"):
        PrivacyLedger(None, delta=0.0)
    with pytest.raises(ValueError, match="target_epsilon must be positive or None, got -1"):
        PrivacyLedger(None, delta=DELTA, target_epsilon=-1)
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyLedger(None, delta=DELTA).epsilon("moments")
