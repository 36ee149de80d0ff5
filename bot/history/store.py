"""HistoryStore: the one way in to stored sessions. Composes the session files and the index log.

Layout under data_dir:
    sessions/<id>.json   the truth, one file per session, replaced atomically on every write (files.py)
    index.jsonl          append-only log of summaries and place -> current session bindings, a cache that
                         open() checks against the session files and repairs (index.py)
    quarantine/          broken session files, moved aside with a timestamp

Every writer of a session file holds that session's one lock, so a turn that holds it (`hold`, `hold_current`)
can read the file once and later write from memory: nothing else can have changed the file in between.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from bot.errors import StorageError
from bot.history.files import SessionFiles
from bot.history.held import HeldSession, checked_messages
from bot.history.index import IndexLog, SessionIndex
from bot.sessions import (
    Place,
    PlaceKind,
    Session,
    SessionSummary,
    StoredMessage,
    is_valid_session_id,
    new_session_id,
    utc_now_iso,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Locks = weakref.WeakValueDictionary[str, asyncio.Lock]


class HistoryStore:
    """Sessions and their messages on disk. Use as `async with HistoryStore(path) as store:`."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir)
        self._files = SessionFiles(self._data_dir)
        self._log = IndexLog(self._data_dir / "index.jsonl", self._files)
        # Weak values: a lock lives while someone holds or waits on it, so idle sessions cost no memory.
        self._session_locks: Locks = weakref.WeakValueDictionary()
        self._place_locks: Locks = weakref.WeakValueDictionary()
        self._pending: set[asyncio.Future[Any]] = set()
        self._is_open = False

    # --- life cycle --------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folders, drop leftover temp files, load the index and repair it from the session files."""
        if self._is_open:
            return
        try:
            await self._files.prepare()
            await self._log.open()
        except OSError as exc:
            raise StorageError(f"could not open the history store in {self._data_dir}: {exc}") from exc
        self._is_open = True
        log.info("history store open: %d sessions in %s", self.session_count, self._data_dir)

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

    # --- a turn: hold the session, read once, commit from memory ----------------------------------------------

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[HeldSession]:
        """Hold a session under its one lock, read once. LookupError when the id is invalid or unknown, or the
        file is broken (then quarantined and dropped from the index)."""
        lock, held = await self._take(session_id)
        try:
            yield held
        finally:
            self._let_go(lock, held)

    @asynccontextmanager
    async def hold_current(
        self,
        place: Place,
        *,
        owner_id: int | None,
        title: str = "New chat",
        system_prompt: str | None = None,
    ) -> AsyncIterator[HeldSession]:
        """Hold the place's current session; made on first use, or afresh when the current one is broken."""
        lock, held = await self._take_current(place, owner_id=owner_id, title=title, system_prompt=system_prompt)
        try:
            yield held
        finally:
            self._let_go(lock, held)

    # --- public API --------------------------------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        """How many sessions the index knows, without listing them."""
        return len(self._log.index.summaries)

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
        session = self._new_session(place, owner_id=owner_id, title=title, system_prompt=system_prompt)
        return await self._shielded(self._create_locked(session, make_current))

    async def get(self, session_id: str) -> Session | None:
        """The session, or None when the id is invalid or unknown, or its file is broken (then quarantined)."""
        if not is_valid_session_id(session_id):
            return None
        self._require_open()
        return await self._load(session_id)

    async def current(self, place: Place) -> Session | None:
        """The place's current session; None when it has none or its file is broken."""
        self._require_open()
        session_id = self._log.index.current.get(place.key)
        if session_id is None:
            return None
        session = await self.get(session_id)
        if session is None or session.place.key != place.key:
            return None
        return session

    async def set_current(self, place: Place, session_id: str) -> None:
        """Make an existing session of this place its current one (e.g. to resume an older conversation)."""
        self._require_open()
        summary = self._log.index.summaries.get(session_id) if is_valid_session_id(session_id) else None
        if summary is None or summary.place.key != place.key:
            raise LookupError(f"no session {session_id!r} in {place.key}")
        await self._log.record([SessionIndex.bind(place.key, session_id)])

    async def append(self, session_id: str, messages: Sequence[StoredMessage], *, title: str | None = None) -> Session:
        """Add messages (and optionally a new title) to a session: `hold` + `commit` in one call.

        Raises StorageError when the session is missing or broken, or the disk refuses the write; the previous
        file is then left as it was.
        """
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        new = checked_messages(messages)
        self._require_open()
        return await self._shielded(self._append(session_id, new, title))

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
        return self._log.index.select(guild_id=guild_id, place_keys=place_keys, user_id=user_id, kinds=kinds)

    async def rebuild_index(self) -> int:
        """Throw the index away and rebuild it by reading every session file; returns the session count."""
        self._require_open()
        count = await self._log.rebuild()
        log.info("rebuilt the session index: %d sessions", count)
        return count

    # --- internals ---------------------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._is_open:
            raise RuntimeError("the history store is not open")

    @staticmethod
    def _lock_for(locks: Locks, key: str) -> asyncio.Lock:
        lock = locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            locks[key] = lock
        return lock

    def _new_session(self, place: Place, *, owner_id: int | None, title: str, system_prompt: str | None) -> Session:
        session_id = new_session_id()
        while session_id in self._log.index.summaries:
            session_id = new_session_id()
        now = utc_now_iso()
        return Session(
            id=session_id,
            place=place,
            owner_id=owner_id,
            title=title,
            created_at=now,
            updated_at=now,
            system_prompt=system_prompt,
        )

    def _start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        # A write once begun runs to its end even if the caller is cancelled, so disk and index agree.
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._write_done)
        return task

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.shield(self._start(coro))

    def _write_done(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("history write finished with %r", task.exception())

    async def _load(self, session_id: str) -> Session | None:
        loaded = await self._files.read(session_id)
        if loaded is None:
            await self._log.forget(session_id)
            return None
        return loaded[0]

    async def _take(self, session_id: str) -> tuple[asyncio.Lock, HeldSession]:
        if not is_valid_session_id(session_id):
            raise LookupError(f"invalid session id {session_id!r}")
        self._require_open()
        lock = self._lock_for(self._session_locks, session_id)
        async with self._acquired_on_success(lock):
            session = await self._load(session_id)
            if session is None:
                raise LookupError(f"session {session_id} is missing or its file is broken")
        return lock, self._held(session)

    async def _take_current(
        self, place: Place, *, owner_id: int | None, title: str, system_prompt: str | None
    ) -> tuple[asyncio.Lock, HeldSession]:
        self._require_open()
        # The place lock covers finding or making the session, not the turn: two first messages at once share one.
        async with self._lock_for(self._place_locks, place.key):
            session_id = self._log.index.current.get(place.key)
            if session_id is not None:
                lock = self._lock_for(self._session_locks, session_id)
                async with self._acquired_on_success(lock):
                    session = await self._load(session_id)
                    usable = session is not None and session.place.key == place.key
                if usable and session is not None:
                    return lock, self._held(session)
                lock.release()
            session = self._new_session(place, owner_id=owner_id, title=title, system_prompt=system_prompt)
            lock = self._lock_for(self._session_locks, session.id)
            async with self._acquired_on_success(lock):  # never waits: nobody else knows the new id yet
                await self._shielded(self._write_new(session, make_current=True))
            lost = place.key in self._log.index.lost_places
            self._log.index.lost_places.discard(place.key)
            return lock, self._held(session, created=True, replaced_broken=session_id is not None or lost)

    @staticmethod
    @asynccontextmanager
    async def _acquired_on_success(lock: asyncio.Lock) -> AsyncIterator[None]:
        # Leaves the lock held when the block succeeds (the hold owns it from then on), releases it on error.
        await lock.acquire()
        try:
            yield
        except BaseException:
            lock.release()
            raise

    def _held(self, session: Session, *, created: bool = False, replaced_broken: bool = False) -> HeldSession:
        return HeldSession(session, self._start_commit, created=created, replaced_broken=replaced_broken)

    def _let_go(self, lock: asyncio.Lock, held: HeldSession) -> None:
        in_flight = held._end()
        if in_flight is None:
            lock.release()
        else:
            # The holder was cancelled mid-commit: the lock passes on only once that write has landed.
            in_flight.add_done_callback(lambda _task: lock.release())

    def _start_commit(self, session: Session) -> asyncio.Future[Session]:
        return self._start(self._write(session))

    async def _write(self, session: Session) -> Session:
        stamp = await self._files.write(session)
        await self._log.record([SessionIndex.put(session.summary(), stamp)])
        return session

    async def _write_new(self, session: Session, make_current: bool) -> Session:
        stamp = await self._files.write(session)
        records = [SessionIndex.put(session.summary(), stamp)]
        if make_current:
            records.append(SessionIndex.bind(session.place.key, session.id))
        await self._log.record(records)
        return session

    async def _create_locked(self, session: Session, make_current: bool) -> Session:
        async with self._lock_for(self._session_locks, session.id):
            return await self._write_new(session, make_current)

    async def _append(self, session_id: str, messages: tuple[StoredMessage, ...], title: str | None) -> Session:
        try:
            lock, held = await self._take(session_id)
        except LookupError as exc:
            raise StorageError(f"session {session_id} is missing or broken") from exc
        try:
            return await held.commit(messages, title=title)
        finally:
            self._let_go(lock, held)
