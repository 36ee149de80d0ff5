"""A session held under its one lock: read once when the hold began, written from memory by `commit`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from bot.sessions import Session, StoredMessage, utc_now_iso


def checked_messages(messages: Sequence[StoredMessage]) -> tuple[StoredMessage, ...]:
    new = tuple(messages)
    if not all(isinstance(m, StoredMessage) for m in new):
        raise TypeError("append takes StoredMessage objects")
    return new


class HeldSession:
    """A session held under its lock, as read once when the hold began. Made by `HistoryStore.hold*`."""

    def __init__(
        self,
        session: Session,
        start_write: Callable[[Session], asyncio.Future[Session]],
        *,
        created: bool = False,
        replaced_broken: bool = False,
    ) -> None:
        self.session = session
        # True when this hold made the session (the place had none, or only a broken one).
        self.created = created
        # True when the place's current session could not be read, so the caller can tell the user it is gone.
        self.replaced_broken = replaced_broken
        self._start_write = start_write
        self._in_flight: asyncio.Future[Session] | None = None
        self._ended = False

    async def commit(
        self, messages: Sequence[StoredMessage], *, title: str | None = None, replacing: int = 0
    ) -> Session:
        """Add messages (and optionally a new title), after dropping the last `replacing` ones (a mark this hold
        wrote earlier): one atomic write from memory, then the index.

        Runs to its end even if the caller is cancelled. Raises StorageError when the disk refuses the write;
        the file and `session` are then left as they were.
        """
        new = checked_messages(messages)
        if self._ended:
            raise RuntimeError("this hold has ended; take the session again to write to it")
        await self.settle()
        updated = self.session.with_messages(new, updated_at=utc_now_iso(), title=title, replacing=replacing)
        task = self._start_write(updated)
        self._in_flight = task
        # Set from the task, not after the await: a cancelled caller's write still lands, and so does this.
        task.add_done_callback(self._written)
        return await asyncio.shield(task)

    async def settle(self) -> None:
        """Wait for a write still running (its caller was cancelled; commits are shielded), so that `session`
        is what the file holds and the next commit builds on it."""
        if self._in_flight is not None and not self._in_flight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._in_flight)

    def _written(self, task: asyncio.Future[Session]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.session = task.result()

    def _end(self) -> asyncio.Future[Session] | None:
        """Close the hold; the write still running, if any (the lock must stay held until it lands)."""
        self._ended = True
        task = self._in_flight
        return task if task is not None and not task.done() else None
