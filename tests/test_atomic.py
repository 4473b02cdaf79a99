"""Atomic writes: the old file or the new one, never half of one."""

import os
from pathlib import Path

import pytest

from common import atomic


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic.write_json(target, {"round": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as handle:
            handle.write('{"round": 2, "half')
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(
    "Umask:" not in (Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""),
    reason="this kernel does not report the umask in /proc/self/status",
)
def test_umask_read_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to read it would give other threads' new files mode 0666."""
    old = os.umask(0o027)
    try:
        def no_set(mask):
            raise AssertionError(f"os.umask({mask:o}) called")

        monkeypatch.setattr(os, "umask", no_set)
        atomic.write_text(tmp_path / "a.txt", "x")
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_open_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic.atomic_open(tmp_path / "x", "r"):
            pass
