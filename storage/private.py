"""Folders and files that hold secrets, readable by their owner only.

The coordinator's state directory (database, tokens, secrets key) and the agent's home (its credential)
are 0700, the files in them that hold secrets 0600: created so, and tightened on start when an older
version (or a umask of 022) left them readable by others.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: Path, mode: int, log: logging.Logger) -> None:
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        os.chmod(path, mode)
        log.warning("%s was readable by other users (mode %04o): now %04o", path, current, mode)


def private_dir(path: Path, log: logging.Logger) -> None:
    """Creates `path` (and missing parents) as 0700, or makes an existing one 0700, saying so in the log."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=DIR_MODE)  # the umask can only take bits away
        except FileExistsError:
            pass
    _tighten(path, DIR_MODE, log)


def private_file(path: Path, log: logging.Logger) -> None:
    """Creates `path` empty as 0600 when it is missing, or makes an existing one 0600, saying so in the log."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        _tighten(path, FILE_MODE, log)


def tighten_file(path: Path, log: logging.Logger) -> None:
    """Makes `path` 0600 if it exists and others may read it."""
    _tighten(path, FILE_MODE, log)
