"""The data directory and the SQLite files in it are the bot's alone: ``0700`` and ``0600``.

Modes are set where the file is created (``os.open(..., 0o600)`` before SQLite opens it; SQLite
gives its ``-wal``, ``-shm`` and ``-journal`` files the database file's mode), then enforced
with ``chmod``, so no umask widens them (changing the umask instead would be process-wide and
racy across threads). A directory or file from before that is too open is tightened, with a
warning, when this user owns it; otherwise only the warning. Synchronous: call it off the loop.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) if needed; make it ``0700``."""
    existed = path.is_dir()
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _enforce(path, DIR_MODE, existed)


def ensure_private_file(path: Path) -> None:
    """Create an empty ``path`` with mode ``0600`` unless it exists (an empty file is a valid
    SQLite database); make it ``0600`` either way. Its directory is made private first."""
    ensure_private_dir(path.parent)
    existed = path.exists()
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    _enforce(path, FILE_MODE, existed)
    tighten_sidecars(path)


def tighten_sidecars(path: Path) -> None:
    """Make a database's ``-wal``, ``-shm`` and ``-journal`` files ``0600`` where they exist."""
    for suffix in SIDECAR_SUFFIXES:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            _enforce(sidecar, FILE_MODE, existed=True)


def _enforce(path: Path, mode: int, existed: bool) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:  # a -journal file that SQLite removed meanwhile
        return
    current = stat.S_IMODE(info.st_mode)
    if current == mode:
        return
    too_open = bool(current & ~mode)
    if info.st_uid != os.getuid():
        if too_open:
            log.warning("%s has mode %04o and belongs to another user: others may read the bot's data; "
                        "make it %04o", path, current, mode)
        return
    os.chmod(path, mode)
    if existed and too_open:
        log.warning("%s had mode %04o, which lets others read the bot's data; changed it to %04o",
                    path, current, mode)
