"""Sessions on disk: one JSON file per session written atomically, an append-only index, quarantine of junk.

Layout under data_dir:
    sessions/<id>.json   the truth, one file per session, replaced atomically on every write
    index.jsonl          append-only log of summaries and place -> current session bindings; a cache that
                         open() checks against the session files (inode, size, mtime) and repairs
    quarantine/          broken session files, moved aside with a timestamp
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import weakref
from collections.abc import Collection, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiofiles
import aiofiles.os

from bot.errors import StorageError
from bot.sessions import (
    FileStamp,
    Place,
    PlaceKind,
    Session,
    SessionIndex,
    SessionSummary,
    StoredMessage,
    is_valid_session_id,
    new_session_id,
    recency,
    utc_now_iso,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_TMP_SUFFIX = ".tmp"
# Compaction is due when the log holds this many lines beyond a multiple of the live records. At run time the
# slack is large, so a rewrite (O(sessions)) comes only after O(sessions) appends: O(1) per turn, amortised.
_OPEN_SLACK = 32
_RUNTIME_SLACK = 4096


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _fsync_and_stat(fd: int) -> os.stat_result:
    os.fsync(fd)
    return os.fstat(fd)


def _fsync_dir(path: Path) -> None:
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
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
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
    await asyncio.to_thread(_fsync_dir, path.parent)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def _append_durably(path: Path, data: bytes) -> None:
    async with aiofiles.open(path, "ab") as f:
        await f.write(data)
        await f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())


class HistoryStore:
    """Sessions and their messages on disk. Use as `async with HistoryStore(path) as store:`."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir)
        self._sessions_dir = self._data_dir / "sessions"
        self._quarantine_dir = self._data_dir / "quarantine"
        self._index_path = self._data_dir / "index.jsonl"
        self._index = SessionIndex()
        self._index_lines = 0
        # Set when an index write failed part-way: the log may end in a torn line, so rewrite it whole next time.
        self._index_dirty = False
        self._index_lock = asyncio.Lock()
        # Weak values: a lock lives while someone holds or waits on it, so idle sessions cost no memory.
        self._turn_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._write_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._pending: set[asyncio.Task[Any]] = set()
        self._is_open = False

    # --- life cycle --------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folders, drop leftover temp files, load the index and repair it from the session files."""
        if self._is_open:
            return
        self._index = SessionIndex()
        try:
            await aiofiles.os.makedirs(self._sessions_dir, exist_ok=True)
            await asyncio.to_thread(self._remove_temp_files)
            async with self._index_lock:
                lines, needs_rewrite = await self._load_index()
                changed = await self._reconcile()
                live = self._index.live_records()
                if needs_rewrite or changed or lines > 2 * live + _OPEN_SLACK:
                    await self._compact_locked()
        except OSError as exc:
            raise StorageError(f"could not open the history store in {self._data_dir}: {exc}") from exc
        self._is_open = True
        log.info("history store open: %d sessions in %s", len(self._index.summaries), self._data_dir)

    async def close(self) -> None:
        """Wait for writes in flight (they are shielded from cancellation), then close."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._is_open = False

    async def __aenter__(self) -> HistoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- public API --------------------------------------------------------------------------------------------

    def session_lock(self, session_id: str) -> asyncio.Lock:
        """The lock a chat turn holds from reading history to appending, so one session's turns run in order.

        Separate from the store's own write lock, so `append` inside a held turn does not deadlock.
        """
        return self._lock_for(self._turn_locks, session_id)

    async def create(
        self,
        place: Place,
        *,
        owner_id: int | None,
        title: str,
        system_prompt: str | None,
        make_current: bool = True,
    ) -> Session:
        self._require_open()
        session_id = new_session_id()
        while session_id in self._index.summaries:
            session_id = new_session_id()
        now = utc_now_iso()
        session = Session(
            id=session_id,
            place=place,
            owner_id=owner_id,
            title=title,
            created_at=now,
            updated_at=now,
            system_prompt=system_prompt,
        )
        return await self._shielded(self._write_new(session, make_current))

    async def get(self, session_id: str) -> Session | None:
        """The session, or None when the id is invalid or unknown, or its file is broken (then quarantined)."""
        if not is_valid_session_id(session_id):
            return None
        self._require_open()
        loaded = await self._read_session(session_id)
        if loaded is None:
            if session_id in self._index.summaries:
                await self._record([SessionIndex.drop(session_id)])
            return None
        return loaded[0]

    async def current(self, place: Place) -> Session | None:
        """The place's current session; None when it has none or its file is broken."""
        self._require_open()
        session_id = self._index.current.get(place.key)
        if session_id is None:
            return None
        session = await self.get(session_id)
        if session is None or session.place.key != place.key:
            return None
        return session

    async def set_current(self, place: Place, session_id: str) -> None:
        """Make an existing session of this place its current one (e.g. to resume an older conversation)."""
        self._require_open()
        summary = self._index.summaries.get(session_id) if is_valid_session_id(session_id) else None
        if summary is None or summary.place.key != place.key:
            raise LookupError(f"no session {session_id!r} in {place.key}")
        await self._record([SessionIndex.bind(place.key, session_id)])

    async def append(self, session_id: str, messages: Sequence[StoredMessage], *, title: str | None = None) -> Session:
        """Add messages (and optionally a new title) to a session: one atomic rewrite of that session's file.

        Raises StorageError when the session is missing or broken, or the disk refuses the write; the previous
        file is then left as it was.
        """
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        new = tuple(messages)
        if not all(isinstance(m, StoredMessage) for m in new):
            raise TypeError("append takes StoredMessage objects")
        self._require_open()
        return await self._shielded(self._append(session_id, new, title))

    def get_summary(self, session_id: str) -> SessionSummary | None:
        """The index's summary of one session (no disk access)."""
        return self._index.summaries.get(session_id)

    def list_sessions(
        self,
        *,
        guild_id: int | None = None,
        place_keys: Collection[str] | None = None,
        user_id: int | None = None,
        kinds: Collection[PlaceKind] | None = None,
    ) -> list[SessionSummary]:
        """Summaries from the index, newest `updated_at` first. Filters AND together; `user_id` is the owner."""
        self._require_open()
        return self._index.select(guild_id=guild_id, place_keys=place_keys, user_id=user_id, kinds=kinds)

    async def rebuild_index(self) -> int:
        """Throw the index away and rebuild it by reading every session file; returns the session count."""
        self._require_open()
        async with self._index_lock:
            self._index = SessionIndex()
            await self._reconcile()
            try:
                await self._compact_locked()
            except OSError as exc:
                self._index_dirty = True
                raise StorageError(f"could not write the session index: {exc}") from exc
        log.info("rebuilt the session index: %d sessions", len(self._index.summaries))
        return len(self._index.summaries)

    # --- internals: sessions -----------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._is_open:
            raise RuntimeError("the history store is not open")

    @staticmethod
    def _lock_for(locks: weakref.WeakValueDictionary[str, asyncio.Lock], session_id: str) -> asyncio.Lock:
        lock = locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            locks[session_id] = lock
        return lock

    def _path(self, session_id: str) -> Path:
        # The only place a session path is made: nothing unvalidated ever becomes a path.
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self._sessions_dir / f"{session_id}.json"

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        # A write once begun runs to its end even if the caller is cancelled, so disk and index agree.
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._write_done)
        return await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("history write finished with %r", task.exception())

    async def _write_new(self, session: Session, make_current: bool) -> Session:
        stamp = await self._write_session(session)
        records = [SessionIndex.put(session.summary(), stamp)]
        if make_current:
            records.append(SessionIndex.bind(session.place.key, session.id))
        await self._record(records)
        return session

    async def _append(self, session_id: str, messages: tuple[StoredMessage, ...], title: str | None) -> Session:
        async with self._lock_for(self._write_locks, session_id):
            loaded = await self._read_session(session_id)
            if loaded is None:
                if session_id in self._index.summaries:
                    await self._record([SessionIndex.drop(session_id)])
                raise StorageError(f"session {session_id} is missing or broken")
            updated = loaded[0].with_messages(messages, updated_at=utc_now_iso(), title=title)
            stamp = await self._write_session(updated)
            await self._record([SessionIndex.put(updated.summary(), stamp)])
            return updated

    async def _write_session(self, session: Session) -> FileStamp:
        data = _dumps(session.to_json()).encode("utf-8")
        try:
            return await atomic_write(self._path(session.id), data)
        except OSError as exc:
            raise StorageError(f"could not write session {session.id}: {exc}") from exc

    async def _read_session(self, session_id: str) -> tuple[Session, FileStamp] | None:
        path = self._path(session_id)
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
            await self._quarantine(path, exc)
            return None
        return session, (st.st_ino, st.st_size, st.st_mtime_ns)

    async def _quarantine(self, path: Path, reason: BaseException) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self._quarantine_dir / f"{path.name}.{stamp}"
        try:
            await aiofiles.os.makedirs(self._quarantine_dir, exist_ok=True)
            await aiofiles.os.replace(path, dest)
        except FileNotFoundError:
            return  # another reader moved it first
        except OSError as exc:
            log.warning("session file %s is broken (%s) and could not be moved aside: %s", path, reason, exc)
            return
        log.warning("session file %s is broken (%s); moved it to %s", path, reason, dest)

    def _remove_temp_files(self) -> None:
        removed = 0
        for folder in (self._sessions_dir, self._data_dir):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX) and entry.is_file():
                        with contextlib.suppress(FileNotFoundError):
                            Path(entry.path).unlink()
                        removed += 1
        if removed:
            log.info("removed %d temp files left by an interrupted write", removed)

    def _scan_session_files(self) -> dict[str, FileStamp]:
        found: dict[str, FileStamp] = {}
        with os.scandir(self._sessions_dir) as entries:
            for entry in entries:
                session_id = entry.name.removesuffix(".json")
                if (
                    entry.name.endswith(".json")
                    and is_valid_session_id(session_id)
                    and entry.is_file(follow_symlinks=False)
                ):
                    st = entry.stat(follow_symlinks=False)
                    found[session_id] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    # --- internals: the index (callers hold _index_lock unless noted) -----------------------------------------

    async def _load_index(self) -> tuple[int, bool]:
        """Fold index.jsonl into memory; returns (line count, whether the file must be rewritten)."""
        try:
            async with aiofiles.open(self._index_path, "rb") as f:
                data = await f.read()
        except FileNotFoundError:
            return 0, True
        lines = data.split(b"\n")
        # A crash mid-append leaves a torn last line, or a whole record with no newline after it; both make the
        # next append unsafe until the log is rewritten.
        bad = 0 if data.endswith(b"\n") or not data else 1
        count = 0
        for raw in lines:
            if not raw.strip():
                continue
            count += 1
            try:
                self._index.apply(json.loads(raw))
            except (ValueError, TypeError, KeyError, RecursionError):
                bad += 1
        if bad:
            log.warning("session index %s had %d unreadable lines; rewriting it", self._index_path, bad)
        return count, bad > 0

    async def _reconcile(self) -> bool:
        """Make the in-memory index agree with the session files, reading only files that changed."""
        on_disk = await asyncio.to_thread(self._scan_session_files)
        changed = False
        for session_id in [sid for sid in self._index.summaries if sid not in on_disk]:
            self._index.forget(session_id)
            changed = True
        discovered: list[str] = []
        for session_id, stamp in on_disk.items():
            if self._index.stamps.get(session_id) == stamp:
                continue
            changed = True
            known = session_id in self._index.summaries
            loaded = await self._read_session(session_id)
            if loaded is None:
                self._index.forget(session_id)
                continue
            session, stamp = loaded
            self._index.summaries[session_id] = session.summary()
            self._index.stamps[session_id] = stamp
            if not known:
                discovered.append(session_id)
        # A session the index never heard of was made just before a crash (or the index is new): the newest
        # session of each place becomes current, which is also the rule for a rebuild from nothing.
        for session_id in discovered:
            summary = self._index.summaries[session_id]
            bound = self._index.current.get(summary.place.key)
            if bound is None or recency(summary) > recency(self._index.summaries[bound]):
                self._index.current[summary.place.key] = session_id
        for key in [k for k, sid in self._index.current.items() if self._index.summaries[sid].place.key != k]:
            del self._index.current[key]
            changed = True
        if changed:
            log.info("session index repaired from the session files (%d discovered)", len(discovered))
        return changed

    async def _compact_locked(self) -> None:
        records = self._index.records()
        await atomic_write(self._index_path, "".join(_dumps(r) + "\n" for r in records).encode("utf-8"))
        self._index_lines = len(records)
        self._index_dirty = False

    async def _record(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply records to memory and log them. The session files are the truth, so an index write error is
        logged and repaired later rather than failing a turn that is already safely on disk."""
        batch = list(records)
        async with self._index_lock:
            for record in batch:
                self._index.apply(record)
            limit = 4 * self._index.live_records() + _RUNTIME_SLACK
            try:
                if self._index_dirty or self._index_lines + len(batch) > limit:
                    await self._compact_locked()
                else:
                    await _append_durably(self._index_path, "".join(_dumps(r) + "\n" for r in batch).encode())
                    self._index_lines += len(batch)
            except OSError as exc:
                self._index_dirty = True
                log.warning("could not update the session index %s (%s); will rewrite it", self._index_path, exc)
