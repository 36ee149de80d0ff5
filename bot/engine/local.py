"""LocalEngine: a transformers model on one worker thread, serving requests by continuous batching.

The worker loops: admit waiting requests into the running batch (one prefill forward for all that join, each
starting from its session's cached prefix when the prompt extends it, or from a shared prefix such as the system
prompt), then one decode step for every running row. Waiting requests are taken round-robin across sessions
(streams.FairQueue), so one user's burst does not starve the others.
A row leaves the batch when it ends (EOS, its own max_new_tokens, its consumer gone) and hands its KV cache to the
session store for the next turn. The model work itself lives in scheduler.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.engine.base import Engine, EngineStats, GenerationRequest
from bot.engine.kv_cache import SessionKVCache
from bot.engine.loading import model_load_kwargs
from bot.engine.scheduler import OUT_OF_MEMORY, StepCounters, StepScheduler, free_cached_memory
from bot.engine.streams import DONE, FairQueue, RequestStream
from bot.errors import EngineDeadError, GenerationFailedError, PromptTooLongError, QueueFullError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bot.config import ModelSettings

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    """Runs a Hugging Face causal LM in this process, on one dedicated worker thread."""

    counts_tokens = True  # the scheduler counts every generated token in stats.tokens_generated

    def __init__(
        self,
        settings: ModelSettings,
        *,
        hf_token: str | None = None,
        loader: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None,
    ) -> None:
        """`loader`, when given, builds the model and tokenizer on the worker thread instead of `settings.name`
        (the benchmark's random-weight LLaMA-2-7B shapes, which exist in no folder)."""
        self.settings = settings
        self._loader = loader
        self.model_name = settings.name
        self.context_length = settings.context_length or 0  # the model's own limit is known after start()
        self._hf_token = hf_token
        self._model: PreTrainedModel | None = None
        self._pad_id = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._vocab_size = 0
        # Guards _waiting, _open, _closing and _dead; never held while the model runs.
        self._cond = threading.Condition()
        self._waiting = FairQueue()
        self._open: set[RequestStream] = set()
        self._closing = False
        self._dead: str | None = "engine not started"
        self._thread: threading.Thread | None = None
        self._counters = StepCounters()
        self._sessions = SessionKVCache(settings.kv_cache_budget_mb * 2**20)

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
        # Open streams not waiting: being generated, or between the queue and the batch for a moment.
        with self._cond:
            return len(self._open) - len(self._waiting)

    @property
    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            batches=c.prefills,
            requests=c.requests,
            largest_batch=c.largest_batch,
            steps=c.steps,
            prefilled_tokens=c.prefilled_tokens,
            reused_tokens=c.reused_tokens,
            cached_sessions=len(self._sessions),
            cache_bytes=self._sessions.nbytes,
            tokens_generated=c.tokens_generated,
        )

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
                if item is DONE:
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
                self._waiting.forget(stream)

    def _submit(self, request: GenerationRequest) -> RequestStream:
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if self._closing:
                raise EngineDeadError("engine closed")
            self._check_prompt(request)
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            stream = RequestStream(request, asyncio.get_running_loop())
            self._waiting.push(stream)
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
        if self._loader is not None:
            model, tokenizer = self._loader()
        else:
            common: dict[str, object] = {"token": self._hf_token}
            if s.gguf_file:
                common["gguf_file"] = s.gguf_file
            tokenizer = AutoTokenizer.from_pretrained(s.name, **common)
            model = AutoModelForCausalLM.from_pretrained(s.name, **model_load_kwargs(s), **common)
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
        scheduler = StepScheduler(
            self.model,
            self.tokenizer,
            eos_ids=self._eos_ids,
            pad_id=self._pad_id,
            sessions=self._sessions,
            counters=self._counters,
        )
        # One inference mode around the whole loop: the caches it makes are reshaped between steps too.
        with torch.inference_mode():
            while (joining := self._next_joining(scheduler)) is not None:
                if joining:
                    self._admit(scheduler, joining)
                if self._closing:
                    return
                if scheduler.rows:
                    self._step(scheduler)

    def _next_joining(self, scheduler: StepScheduler) -> list[RequestStream] | None:
        """Requests that join the batch now (waiting only while nothing runs); None when closing."""
        s = self.settings
        with self._cond:
            while not self._waiting and not scheduler.rows and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            joining: list[RequestStream] = []
            width = 0
            while self._waiting and len(scheduler.rows) + len(joining) < s.max_batch_size:
                stream = self._waiting.peek()
                ids = stream.request.prompt_ids
                new = len(ids) - scheduler.sessions.reusable(stream.request.session_id, ids)
                # The prefill pads every joining prompt to the longest new part: cap that padded size.
                if joining and max(width, new) * (len(joining) + 1) > s.max_batch_tokens:
                    break
                width = max(width, new)
                joining.append(self._waiting.pop())
            return joining

    def _admit(self, scheduler: StepScheduler, streams: list[RequestStream]) -> None:
        streams = [stream for stream in streams if not stream.cancelled]
        if not streams:
            return
        try:
            scheduler.admit(streams)
        except Exception as exc:
            log.exception("prefill failed for %d joining requests", len(streams))
            _fail(streams, exc)
        else:
            return
        free_cached_memory()  # outside the handler: the traceback held the failed step's tensors

    def _step(self, scheduler: StepScheduler) -> None:
        try:
            scheduler.step()
        except Exception as exc:
            rows = scheduler.drop_all()
            log.exception("decode step failed for a batch of %d requests", len(rows))
            _fail([row.stream for row in rows], exc)
        else:
            return
        free_cached_memory()

    def _shut_down(self, reason: str) -> None:
        with self._cond:
            self._dead = reason
            streams = list(self._open)
            self._waiting.clear()
        for stream in streams:
            stream.finish(EngineDeadError(reason))


def _fail(streams: Sequence[RequestStream], exc: Exception) -> None:
    # An out-of-memory that reaches here was not cured by splitting the batch (scheduler.py), or struck outside a
    # forward call (the batch's KV buffers growing): say so rather than "the model failed".
    user_message = OUT_OF_MEMORY if isinstance(exc, torch.OutOfMemoryError) else None
    for stream in streams:
        error = GenerationFailedError(f"the model raised {exc!r}", user_message=user_message)
        error.__cause__ = exc
        stream.finish(error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # start() was cancelled while the model loaded
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
