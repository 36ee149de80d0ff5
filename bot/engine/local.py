"""LocalEngine: a transformers model on one worker thread, serving waiting requests as left-padded batches.

The worker takes every waiting request with the same sampling parameters (up to max_batch_size) and runs them
through one `model.generate` call. A streamer routes each row's new tokens to its request's asyncio.Queue; a
stopping criterion ends rows whose consumer left or that reached their own max_new_tokens. Continuous batching or
per-session KV-cache reuse can replace `_serve` later without changing `generate()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Final

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

from bot.engine.base import Engine, EngineStats, GenerationRequest
from bot.errors import EngineDeadError, GenerationFailedError, PromptTooLongError, QueueFullError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bot.config import ModelSettings

log = logging.getLogger(__name__)

_DONE: Final = object()
_INCOMPLETE_CHAR: Final = "\ufffd"


class _Stream:
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
            self.push(_DONE if error is None else error)


class _Row:
    """One request's place in a running batch: its generated ids and the text already sent."""

    def __init__(self, stream: _Stream, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]) -> None:
        self.stream = stream
        self.prompt = stream.request.prompt_ids
        self.max_new_tokens = stream.request.sampling.max_new_tokens
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._ids: list[int] = []
        self._text = ""
        self.done = False

    def add(self, token: int) -> None:
        if self.done:
            return  # generate keeps padding finished rows until the whole batch ends
        if self.stream.cancelled:
            self.done = True
            return
        if token in self._eos_ids:
            self.complete()
            return
        self._ids.append(token)
        text = self._decode()
        # Hold back while the last token ends inside a multi-byte character.
        if not text.endswith(_INCOMPLETE_CHAR):
            self._emit(text)
        if len(self._ids) >= self.max_new_tokens:
            self.complete()

    def complete(self) -> None:
        """End the row normally, sending whatever text was held back."""
        if not self.done:
            self.done = True
            self._emit(self._decode())
            self.stream.finish()

    def _decode(self) -> str:
        # Decoding the whole answer each step (not token by token) keeps word-boundary spaces right.
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def _emit(self, text: str) -> None:
        if len(text) > len(self._text):
            self.stream.push(text[len(self._text) :])
            self._text = text


class _BatchStreamer(BaseStreamer):
    """Hands each step's token column to the batch's rows."""

    def __init__(self, rows: Sequence[_Row]) -> None:
        self._rows = rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first put is the prompt itself
            self._prompt_seen = True
            return
        for row, token in zip(self._rows, value.reshape(-1).tolist(), strict=True):
            row.add(token)

    def end(self) -> None:
        """Rows still open are settled by the batch runner, which knows whether the engine is closing."""


class _RowStopper(StoppingCriteria):
    """Stops each row on its own: consumer gone, own max_new_tokens reached, or the engine closing."""

    def __init__(self, rows: Sequence[_Row], prompt_width: int, closing: Callable[[], bool]) -> None:
        self._rows = rows
        self._prompt_width = prompt_width
        self._closing = closing

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self._prompt_width
        closing = self._closing()
        flags = [closing or row.done or row.stream.cancelled or generated >= row.max_new_tokens for row in self._rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def _sampling_key(stream: _Stream) -> tuple[float, float, float]:
    s = stream.request.sampling
    return (s.temperature, s.top_p, s.repetition_penalty)


class LocalEngine(Engine):
    """Runs a Hugging Face causal LM in this process, on one dedicated worker thread."""

    def __init__(self, settings: ModelSettings, *, hf_token: str | None = None) -> None:
        self.settings = settings
        self.model_name = settings.name
        self.context_length = settings.context_length or 0  # the model's own limit is known after start()
        self._hf_token = hf_token
        self._model: PreTrainedModel | None = None
        self._pad_id = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._vocab_size = 0
        # Guards _waiting, _open, _closing and _dead; never held while the model runs.
        self._cond = threading.Condition()
        self._waiting: deque[_Stream] = deque()
        self._open: set[_Stream] = set()
        self._rows: Sequence[_Row] = ()
        self._closing = False
        self._dead: str | None = "engine not started"
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            raise RuntimeError("the model is loaded by start()")
        return self._model

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(not row.done for row in self._rows)

    @property
    def stats(self) -> EngineStats:
        return self._stats

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LocalEngine.start() called twice")
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._worker_main, args=(loop, loaded), name="llm-engine", daemon=True)
        self._thread.start()
        await loaded

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            if self._thread is None:
                self._dead = "engine closed"
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._model = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        stream = self._submit(request)
        try:
            while True:
                item = await stream.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, str)
                yield item
        finally:
            # Normal end, error, break (GeneratorExit) or task cancellation: the request leaves queue and batch.
            stream.cancelled = True
            with self._cond:
                self._open.discard(stream)
                if stream in self._waiting:
                    self._waiting.remove(stream)

    def _submit(self, request: GenerationRequest) -> _Stream:
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if self._closing:
                raise EngineDeadError("engine closed")
            self._check_prompt(request)
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            stream = _Stream(request, asyncio.get_running_loop())
            self._waiting.append(stream)
            self._open.add(stream)
            self._cond.notify()
        return stream

    def _check_prompt(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise ValueError(f"prompt holds token ids outside the vocabulary of {self._vocab_size}")
        limit = self.context_length - request.sampling.max_new_tokens
        if len(ids) > limit:
            raise PromptTooLongError(len(ids), max(limit, 0))

    # --- worker thread -------------------------------------------------------------------------------------

    def _worker_main(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            self._load()
        except BaseException as exc:
            with self._cond:
                self._dead = f"model failed to load: {exc!r}"
            loop.call_soon_threadsafe(_settle, loaded, exc)
            return
        with self._cond:
            self._dead = None
        loop.call_soon_threadsafe(_settle, loaded, None)
        reason = "engine closed"
        try:
            self._serve()
        except BaseException as exc:
            log.critical("engine worker died; every stream now fails", exc_info=True)
            reason = f"engine worker died: {exc!r}"
        finally:
            self._shut_down(reason)

    def _load(self) -> None:
        s = self.settings
        common: dict[str, object] = {"token": self._hf_token}
        if s.gguf_file:
            common["gguf_file"] = s.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(s.name, **common)
        dtype = "auto" if s.dtype == "auto" else getattr(torch, s.dtype)
        model = AutoModelForCausalLM.from_pretrained(s.name, dtype=dtype, device_map=s.device_map, **common)
        model.eval()
        tokenizer.padding_side = "left"
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        pad = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) if i is not None),
            0,
        )
        context = s.context_length or getattr(model.config, "max_position_embeddings", None)
        if not context:
            raise ValueError(f"{s.name} does not state its context length; set model.context_length")
        self.tokenizer = tokenizer
        self._model = model
        self._eos_ids = frozenset(eos_ids)
        self._pad_id = pad
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self.context_length = context
        log.info(
            "loaded %s on %s: %s, %.1fM parameters, %.0f MiB, context %d tokens",
            s.name,
            model.device,
            model.dtype,
            model.num_parameters() / 1e6,
            model.get_memory_footprint() / 2**20,
            context,
        )

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[_Stream] | None:
        """Wait for requests; take the oldest one and those waiting with the same sampling parameters."""
        with self._cond:
            while not self._waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            key = _sampling_key(self._waiting[0])
            batch: list[_Stream] = []
            rest: deque[_Stream] = deque()
            for stream in self._waiting:
                if len(batch) < self.settings.max_batch_size and _sampling_key(stream) == key:
                    batch.append(stream)
                else:
                    rest.append(stream)
            self._waiting = rest
            return batch

    def _run_batch(self, streams: list[_Stream]) -> None:
        rows = [_Row(stream, self.tokenizer, self._eos_ids) for stream in streams]
        self._rows = rows
        self._stats = dataclasses.replace(
            self._stats,
            batches=self._stats.batches + 1,
            requests=self._stats.requests + len(rows),
            largest_batch=max(self._stats.largest_batch, len(rows)),
        )
        try:
            self._generate(rows)
        except Exception as exc:
            log.exception("generation failed for a batch of %d requests", len(rows))
            for row in rows:
                error = GenerationFailedError(f"the model raised {exc!r}")
                error.__cause__ = exc
                row.done = True
                row.stream.finish(error)
        else:
            for row in rows:
                # Rows cut off by close() are failed by _shut_down; the rest ended with the batch.
                if not self._closing:
                    row.complete()
        finally:
            self._rows = ()

    def _generate(self, rows: Sequence[_Row]) -> None:
        model = self.model
        width = max(len(row.prompt) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            attention_mask[i, width - len(row.prompt) :] = 1
        sampling = rows[0].stream.request.sampling
        options: dict[str, object] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p)
        model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max(row.max_new_tokens for row in rows),
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self._pad_id,
            eos_token_id=sorted(self._eos_ids),
            streamer=_BatchStreamer(rows),
            stopping_criteria=StoppingCriteriaList([_RowStopper(rows, width, lambda: self._closing)]),
            **options,
        )

    def _shut_down(self, reason: str) -> None:
        with self._cond:
            self._dead = reason
            streams = list(self._open)
            self._waiting.clear()
        for stream in streams:
            stream.finish(EngineDeadError(reason))


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # start() was cancelled while the model loaded
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
