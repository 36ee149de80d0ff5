"""Checks of this machine made at start-up, before anything loads: each problem is one ConfigError line.

The history store would find the same problems later, as an OSError deep in a stack trace, or not at all: it
makes missing folders with their parents, so a mistyped or unmounted path would quietly fill another disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bot.config import Settings
from bot.errors import ConfigError

DATA_DIR_KEY = "storage.data_dir"


def check_data_dir(settings: Settings) -> None:
    """`[storage] data_dir` is a folder the bot can write in. Only the folder itself is made here when missing:
    its parent must exist."""
    path = settings.storage.data_dir
    source = settings.source or "<config>"
    if path.exists() and not path.is_dir():
        raise ConfigError(source, DATA_DIR_KEY, f"{path} is a file, not a folder")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(
                source,
                DATA_DIR_KEY,
                f"{path} cannot be made: its parent folder {path.parent} does not exist (create it, or fix the path)",
            )
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                source,
                DATA_DIR_KEY,
                f"{path} cannot be made in {path.parent}: {exc.strerror} (the bot's user needs write access there)",
            ) from None
    for folder in (path, path / "sessions"):
        if folder.is_dir():
            _check_writable(folder, source)


def _check_writable(folder: Path, source: Path | str) -> None:
    # Trying is the only sure test: permissions, ACLs, a read-only mount and root's overrides all take part.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(
            source,
            DATA_DIR_KEY,
            f"cannot write in {folder}: {exc.strerror} (the bot's user needs write access to it)",
        ) from None
