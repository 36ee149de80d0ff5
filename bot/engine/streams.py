"""A request's way back to its consumer: a thread-safe stream, and the text deltas decoded from its tokens."""

from __future__ import annotations

import asyncio
import contextlib
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

    def finish(self, error: BaseException | None = None) -> None:
        """Deliver the last item, once (worker thread only)."""
        if not self.closed:
            self.closed = True
            self.push(DONE if error is None else error)


class DeltaText:
    """Turns an answer's token ids into text deltas for a stream."""

    def __init__(self, stream: RequestStream, tokenizer: PreTrainedTokenizerBase) -> None:
        self._stream = stream
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""

    def add(self, token: int) -> None:
        self._ids.append(token)
        text = self._decode()
        # Hold back while the last token ends inside a multi-byte character.
        if not text.endswith(_INCOMPLETE_CHAR):
            self._emit(text)

    def flush(self) -> None:
        """Send whatever text was held back."""
        self._emit(self._decode())

    def _decode(self) -> str:
        # Decoding the whole answer each step (not token by token) keeps word-boundary spaces right.
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def _emit(self, text: str) -> None:
        if len(text) > len(self._text):
            self._stream.push(text[len(self._text) :])
            self._text = text
