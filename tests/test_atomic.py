"""Atomic writes: the old file or the new one, never half of one."""

import os

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


def test_atomic_open_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic.atomic_open(tmp_path / "x", "r"):
            pass
