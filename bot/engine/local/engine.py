"""LocalEngine: a transformers model on one worker thread, serving requests by continuous batching.

This is the async face (vLLM's AsyncLLM): it checks a request, queues it with the core (core.py) and streams back
what the worker thread sends. The worker's loop, the batch and the model calls live behind it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

import transformers

from bot.engine.base import Engine, EngineStats, GenerationRequest, TokenPrompt
from bot.engine.local.core import EngineCore
from bot.engine.local.loading import check_transformers_version, load_model
from bot.engine.local.output import DONE, RequestStream
from bot.errors import InvalidPromptError, PromptTooLongError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bot.config import ModelSettings
    from bot.engine.local.loading import LoadedModel


class LocalEngine(Engine):
    """Runs a Hugging Face causal LM in this process, on one dedicated worker thread; takes TokenPrompts only."""

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
        self.model_name = settings.name
        self.context_length = settings.context_length or 0  # the model's own limit is known after start()
        self._core = EngineCore(settings, lambda: load_model(settings, hf_token=hf_token, loader=loader))
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> PreTrainedModel:
        loaded = self._core.loaded
        if loaded is None:
            raise RuntimeError("the model is loaded by start()")
        return loaded.model

    @property
    def waiting(self) -> int:
        return self._core.waiting

    @property
    def running(self) -> int:
        return self._core.running

    @property
    def stats(self) -> EngineStats:
        return self._core.stats

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LocalEngine.start() called twice")
        check_transformers_version(transformers.__version__)
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._worker_main, args=(loop, loaded), name="llm-engine", daemon=True)
        self._thread.start()
        await loaded

    async def close(self) -> None:
        self._core.stop()
        if self._thread is None:
            self._core.shut_down("engine closed")
        else:
            await asyncio.to_thread(self._thread.join)
        self._core.unload()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[str, None]:
        stream = self._submit(request)
        try:
            while True:
                item = await stream.queue.get()
                if item is DONE:
                    if request.on_finish is not None and stream.finish_reason is not None:
                        request.on_finish(stream.finish_reason)
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, str)
                yield item
        finally:
            # Normal end, error, break (GeneratorExit) or task cancellation: the request leaves queue and batch.
            self._core.remove(stream)

    def _submit(self, request: GenerationRequest) -> RequestStream:
        loaded = self._core.check_serving()
        stream = RequestStream(request, _checked_ids(request, loaded), asyncio.get_running_loop())
        self._core.add(stream)
        return stream

    def _worker_main(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            model = self._core.load()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, loaded, exc)
            return
        self.tokenizer = model.tokenizer
        self.context_length = model.context_length
        loop.call_soon_threadsafe(_settle, loaded, None)
        self._core.serve()


def _checked_ids(request: GenerationRequest, loaded: LoadedModel) -> tuple[int, ...]:
    """The prompt's token IDs, once they are known to fit the model and its context with the answer."""
    prompt = request.prompt
    if not isinstance(prompt, TokenPrompt):
        raise InvalidPromptError(f"LocalEngine takes token IDs, not {type(prompt).__name__}")
    ids = prompt.ids
    if not ids:
        raise InvalidPromptError("empty prompt")
    if min(ids) < 0 or max(ids) >= loaded.vocab_size:
        raise InvalidPromptError(f"prompt holds token ids outside the vocabulary of {loaded.vocab_size}")
    limit = loaded.context_length - request.sampling.max_new_tokens
    if len(ids) > limit:
        raise PromptTooLongError(len(ids), max(limit, 0))
    return ids


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # start() was cancelled while the model loaded
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
