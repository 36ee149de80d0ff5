"""The waiting requests of LocalEngine, in the order they join the batch: round-robin across sessions."""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.engine.local.output import RequestStream


class FairQueue:
    """Waiting requests, served round-robin across sessions so that one user's burst does not starve the others.

    The next request is the oldest of the group served least recently (a group never served first, oldest request
    first among those). A group is a session; a request without one is a group of its own. A group remembers when
    it was last served for as long as it has a request open (waiting or running): a session whose only request was
    just admitted is not new when its next one arrives, and forgetting closed groups keeps the memory bounded by
    the open requests. Not thread-safe: the engine holds its lock around every call.
    """

    def __init__(self) -> None:
        self._groups: dict[object, deque[tuple[int, RequestStream]]] = {}
        self._served: dict[object, int] = {}
        self._open: dict[object, int] = {}
        self._arrivals = itertools.count()
        self._ticks = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, stream: RequestStream) -> None:
        key = _group(stream)
        self._groups.setdefault(key, deque()).append((next(self._arrivals), stream))
        self._open[key] = self._open.get(key, 0) + 1
        self._len += 1

    def peek(self) -> RequestStream:
        """The request pop() returns next; IndexError when none waits."""
        return self._groups[self._next_group()][0][1]

    def pop(self) -> RequestStream:
        key = self._next_group()
        group = self._groups[key]
        _, stream = group.popleft()
        if not group:
            del self._groups[key]
        self._served[key] = next(self._ticks)
        self._len -= 1
        return stream

    def forget(self, stream: RequestStream) -> None:
        """The request left the engine (answered, failed or abandoned): drop it from the queue if it still waits."""
        key = _group(stream)
        group = self._groups.get(key)
        if group is not None:
            for i, (_, waiting) in enumerate(group):
                if waiting is stream:
                    del group[i]
                    self._len -= 1
                    if not group:
                        del self._groups[key]
                    break
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
            self._served.pop(key, None)

    def clear(self) -> None:
        """Drop every waiting request (their streams are settled by the caller)."""
        self._groups.clear()
        self._len = 0

    def _next_group(self) -> object:
        if not self._groups:
            raise IndexError("no request waits")
        return min(self._groups, key=lambda key: (self._served.get(key, -1), self._groups[key][0][0]))


def _group(stream: RequestStream) -> object:
    session = stream.request.session_id
    return stream if session is None else session
