"""Session files: one JSON file per session, replaced atomically on every write; junk is moved aside, not lost.

Layout under data_dir:
    sessions/<id>.json   the truth, one file per session
    quarantine/          broken session files, moved aside with a timestamp
Temp files (".<name>.<random>.tmp") are what an interrupted atomic write leaves behind; open() removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import aiofiles
import aiofiles.os

from bot.errors import StorageError
from bot.sessions import Session, is_valid_session_id

log = logging.getLogger(__name__)

# (inode, size, mtime_ns) of a file. Every atomic write makes a new inode, so a changed file shows.
FileStamp = tuple[int, int, int]

TMP_SUFFIX = ".tmp"


def dumps(obj: object) -> str:
    """Compact JSON, UTF-8 kept as is: the one encoding of session files and index lines."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def stamp_of(st: os.stat_result) -> FileStamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_and_stat(fd: int) -> os.stat_result:
    os.fsync(fd)
    return os.fstat(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (blocking: call through a thread)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some platforms cannot open a directory; the rename is all we can do there
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("fsync of directory %s failed: %s", path, exc)
    finally:
        os.close(fd)


async def atomic_write(path: Path, data: bytes) -> FileStamp:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    try:
        async with aiofiles.open(tmp, "xb") as f:
            await f.write(data)
            await f.flush()
            st = await asyncio.to_thread(_fsync_and_stat, f.fileno())
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            await aiofiles.os.remove(tmp)
        raise
    await asyncio.to_thread(fsync_dir, path.parent)
    return stamp_of(st)


async def append_durably(path: Path, data: bytes) -> None:
    """Append `data` to `path` and fsync it; a crash may leave a torn tail, which the reader must tolerate."""
    async with aiofiles.open(path, "ab") as f:
        await f.write(data)
        await f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())


def remove_temp_files(folders: list[Path]) -> int:
    """Delete what interrupted atomic writes left in `folders` (blocking: call through a thread)."""
    removed = 0
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        Path(entry.path).unlink()
                    removed += 1
    if removed:
        log.info("removed %d temp files left by an interrupted write", removed)
    return removed


class SessionFiles:
    """The sessions folder: read, write, scan, quarantine. Knows nothing of locks or the index."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.sessions_dir = self.data_dir / "sessions"
        self.quarantine_dir = self.data_dir / "quarantine"

    async def prepare(self) -> None:
        """Create the folders and drop leftover temp files (in the data folder too: the index writes there)."""
        await aiofiles.os.makedirs(self.sessions_dir, exist_ok=True)
        await asyncio.to_thread(remove_temp_files, [self.sessions_dir, self.data_dir])

    def path(self, session_id: str) -> Path:
        # The only place a session path is made: nothing unvalidated ever becomes a path.
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self.sessions_dir / f"{session_id}.json"

    async def write(self, session: Session) -> FileStamp:
        """One atomic replace of the session's file; StorageError when the disk refuses (old file kept)."""
        data = dumps(session.to_json()).encode("utf-8")
        try:
            return await atomic_write(self.path(session.id), data)
        except OSError as exc:
            raise StorageError(f"could not write session {session.id}: {exc}") from exc

    async def read(self, session_id: str) -> tuple[Session, FileStamp] | None:
        """The session and its file's stamp; None when there is no file or it is junk (then quarantined)."""
        path = self.path(session_id)
        try:
            async with aiofiles.open(path, "rb") as f:
                data = await f.read()
                st = await asyncio.to_thread(os.fstat, f.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"could not read session {session_id}: {exc}") from exc
        try:
            session = Session.from_json(json.loads(data))
            if session.id != session_id:
                raise ValueError(f"file holds session {session.id!r}")
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            await self._quarantine(path, st.st_ino, exc)
            return None
        return session, stamp_of(st)

    def scan(self) -> dict[str, FileStamp]:
        """Every well-named session file and its stamp, without reading any (blocking: call through a thread)."""
        found: dict[str, FileStamp] = {}
        with os.scandir(self.sessions_dir) as entries:
            for entry in entries:
                session_id = entry.name.removesuffix(".json")
                if (
                    entry.name.endswith(".json")
                    and is_valid_session_id(session_id)
                    and entry.is_file(follow_symlinks=False)
                ):
                    found[session_id] = stamp_of(entry.stat(follow_symlinks=False))
        return found

    async def _quarantine(self, path: Path, inode: int, reason: BaseException) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.quarantine_dir / f"{path.name}.{stamp}"
        try:
            # A writer may have replaced the junk with a good file since we read it; that one is not ours to move.
            if (await aiofiles.os.stat(path)).st_ino != inode:
                return
            await aiofiles.os.makedirs(self.quarantine_dir, exist_ok=True)
            await aiofiles.os.replace(path, dest)
        except FileNotFoundError:
            return  # another reader moved it first
        except OSError as exc:
            log.warning("session file %s is broken (%s) and could not be moved aside: %s", path, reason, exc)
            return
        log.warning("session file %s is broken (%s); moved it to %s", path, reason, dest)
