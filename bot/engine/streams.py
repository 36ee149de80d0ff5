"""A request's way through the engine: the fair waiting queue, a thread-safe stream back to its consumer, and the
text deltas decoded from its tokens."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.engine.base import GenerationRequest

DONE: Final = object()
_INCOMPLETE_CHAR: Final = "\ufffd"


class RequestStream:
    """One request's channel from the worker thread to its consumer on the event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        # Written by the consumer, read by the worker: a plain bool is enough, the worker only polls it.
        self.cancelled = False
        self.closed = False

    def push(self, item: object) -> None:
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def finish(self, error: BaseException | None = None, outbox: Outbox | None = None) -> None:
        """Deliver the last item, once (worker thread only); through `outbox` when given."""
        if not self.closed:
            self.closed = True
            item = DONE if error is None else error
            if outbox is None:
                self.push(item)
            else:
                outbox.put(self, item)


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


class Outbox:
    """Items for many streams, handed to their event loops with one call per loop and step.

    Each call_soon_threadsafe wakes the loop through its self-pipe and takes the GIL: once per step instead of
    once per row and token keeps the loop free while a big batch decodes.
    """

    def __init__(self) -> None:
        self._items: list[tuple[RequestStream, object]] = []

    def put(self, stream: RequestStream, item: object) -> None:
        self._items.append((stream, item))

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = {}
        for stream, item in self._items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self._items = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[RequestStream, object]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class DeltaText:
    """Turns an answer's token ids into text deltas for a stream, decoding a few tokens per step.

    The answer is decoded in a sliding window (vLLM's detokenizer): the text of ids[prefix:] minus that of
    ids[prefix:read] is what the newest tokens added. Starting the window a few tokens back keeps word-boundary
    spaces right without decoding the whole answer every step.
    """

    def __init__(self, stream: RequestStream, tokenizer: PreTrainedTokenizerBase, outbox: Outbox) -> None:
        self._stream = stream
        self._tokenizer = tokenizer
        self._outbox = outbox
        self._ids: list[int] = []
        self._prefix = 0  # where the decoded window starts
        self._read = 0  # tokens whose text was sent

    def add(self, token: int) -> None:
        self._ids.append(token)
        self._emit(final=False)

    def flush(self) -> None:
        """Send whatever text was held back."""
        self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        if self._read == len(self._ids):
            return
        seen = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        # Hold back while the last token ends inside a multi-byte character.
        if len(text) > len(seen) and (final or not text.endswith(_INCOMPLETE_CHAR)):
            self._outbox.put(self._stream, text[len(seen) :])
            self._prefix, self._read = self._read, len(self._ids)

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)
