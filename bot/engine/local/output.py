"""What goes back from LocalEngine's worker thread to a request's consumer: each row's new tokens checked for the
end of its answer and decoded into text deltas, a thread-safe stream per request, and the outbox that hands a
whole step's items over at once (vLLM's output processor and detokenizer, in small)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.engine.base import FinishReason, GenerationRequest

DONE: Final = object()
_INCOMPLETE_CHAR: Final = "\ufffd"
# Prompt tokens a continued answer's text is decoded after, so its first word keeps its space (vLLM's detokenizer
# starts from the prompt's last tokens too).
CONTINUED_CONTEXT_TOKENS: Final = 6


class RequestStream:
    """One request's channel from the worker thread to its consumer on the event loop."""

    def __init__(
        self, request: GenerationRequest, prompt_ids: tuple[int, ...], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request = request
        # The request's TokenPrompt ids, checked by the engine: the worker reads them often.
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        # Written by the consumer, read by the worker: a plain bool is enough, the worker only polls it.
        self.cancelled = False
        self.closed = False
        # Set by the worker before the stream's DONE: "stop" at the end of the answer, "length" at its limit.
        self.finish_reason: FinishReason | None = None

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


class Row:
    """One request in the running batch: the tokens fed to the model so far, and its answer's tokens checked for
    the end (EOS, max_new_tokens, the consumer gone) and streamed as text."""

    def __init__(
        self,
        stream: RequestStream,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        outbox: Outbox,
    ) -> None:
        self.stream = stream
        self.request = stream.request
        self.prompt = stream.prompt_ids
        self.fed: list[int] = []
        self.generated = 0
        self.next_token = -1
        self.done = False
        self.failed = False  # its stream got an error; its cache is not kept
        self._eos_ids = eos_ids
        self._outbox = outbox
        prompt = stream.request.prompt
        context = self.prompt[-CONTINUED_CONTEXT_TOKENS:] if prompt.continues_answer else ()
        self._text = DeltaText(stream, tokenizer, outbox, context=context)

    @property
    def leaving(self) -> bool:
        return self.done or self.stream.cancelled

    def accept(self, token: int) -> bool:
        """Take the model's next token: stream it, or end the row on EOS or at its max_new_tokens; True when it
        was an answer token (streamed)."""
        if self.stream.cancelled:
            self.done = True
            return False
        if token in self._eos_ids:
            self.complete("stop")
            return False
        self.generated += 1
        self._text.add(token)
        if self.generated >= self.request.sampling.max_new_tokens:
            self.complete("length")
        else:
            self.next_token = token
        return True

    def fail(self, error: BaseException) -> None:
        self.done = self.failed = True
        self.stream.finish(error, outbox=self._outbox)

    def complete(self, reason: FinishReason) -> None:
        # The stream itself ends in retire(), once the row's cache is stored: a consumer that saw its answer end
        # finds its session's cache in place for the next turn.
        if not self.done:
            self.done = True
            self.stream.finish_reason = reason
            self._text.flush()


class DeltaText:
    """Turns an answer's token ids into text deltas for a stream, decoding a few tokens per step.

    The answer is decoded in a sliding window (vLLM's detokenizer): the text of ids[prefix:] minus that of
    ids[prefix:read] is what the newest tokens added. Starting the window a few tokens back keeps word-boundary
    spaces right without decoding the whole answer every step.
    """

    def __init__(
        self,
        stream: RequestStream,
        tokenizer: PreTrainedTokenizerBase,
        outbox: Outbox,
        *,
        context: tuple[int, ...] = (),
    ) -> None:
        """`context`: tokens already shown (a continued answer's last ones), decoded before the new ones."""
        self._stream = stream
        self._tokenizer = tokenizer
        self._outbox = outbox
        self._ids: list[int] = list(context)
        self._prefix = 0  # where the decoded window starts
        self._read = len(context)  # tokens whose text was sent

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
        # transformers annotates decode str | list[str] without overloads; a flat list of IDs gives one string.
        return cast(str, self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True))
