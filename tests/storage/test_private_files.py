"""The data directory and the SQLite files: created private, tightened when found too open."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from storage.private_files import ensure_private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_and_its_directories_are_private(tmp_path: Path) -> None:
    database = tmp_path / "a" / "data" / "x.sqlite3"
    ensure_private_file(database)
    assert (mode(database.parent), mode(database), database.read_bytes()) == (0o700, 0o600, b"")


def test_what_an_older_version_left_open_is_tightened_with_a_warning(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    database, wal = data / "x.sqlite3", data / "x.sqlite3-wal"
    for path in (database, wal):
        path.write_bytes(b"kept")
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ensure_private_file(database)
    assert (mode(data), mode(database), mode(wal)) == (0o700, 0o600, 0o600)
    assert database.read_bytes() == b"kept"  # opened, never truncated
    assert caplog.text.count("changed it to") == 3
