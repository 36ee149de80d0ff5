"""The core of LocalEngine: the waiting requests, and the worker thread's loop that serves them.

The worker loops: admit waiting requests into the running batch (one prefill forward for all that join, each
starting from its session's cached prefix when the prompt extends it, or from a shared prefix such as the system
prompt), then one decode step for every running row. Waiting requests are taken round-robin across sessions
(queue.FairQueue), so one user's burst does not starve the others. A row leaves the batch when it ends (EOS, its
own max_new_tokens, its consumer gone) and hands its KV cache to the session store for the next turn. The model
work itself is model_runner.py's; this module decides who joins, and what a failure does to whom.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from bot.engine.base import EngineStats
from bot.engine.local.compiled import CompiledSteps
from bot.engine.local.model_runner import ModelRunner, free_cached_memory
from bot.engine.local.queue import FairQueue
from bot.engine.local.session_cache import SessionKVCache
from bot.errors import EngineDeadError, GenerationFailedError, ModelOutOfMemoryError, QueueFullError

if TYPE_CHECKING:
    from bot.config import ModelSettings
    from bot.engine.local.loading import LoadedModel
    from bot.engine.local.output import RequestStream

log = logging.getLogger(__name__)


class EngineCore:
    """Requests go in from the event loop (add, remove, stop); load() and serve() run on the worker thread."""

    def __init__(self, settings: ModelSettings, load: Callable[[], LoadedModel]) -> None:
        self._settings = settings
        self._load = load
        # Guards _waiting, _open, _closing and _dead; never held while the model runs.
        self._cond = threading.Condition()
        self._waiting = FairQueue()
        self._open: set[RequestStream] = set()
        self._closing = False
        self._dead: str | None = "engine not started"
        self.sessions = SessionKVCache(settings.kv_cache_budget_mb * 2**20)
        self.loaded: LoadedModel | None = None
        self._compiled: CompiledSteps | None = None
        self._runner: ModelRunner | None = None
        self._served = EngineStats()  # the counts of a runner that has stopped

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
        runner = self._runner
        counted = runner.stats if runner is not None else self._served
        return dataclasses.replace(counted, cached_sessions=len(self.sessions), cache_bytes=self.sessions.nbytes)

    # --- the event loop's side -----------------------------------------------------------------------------

    def check_serving(self) -> LoadedModel:
        """The loaded model, while requests are taken; EngineDeadError otherwise."""
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if self._closing:
                raise EngineDeadError("engine closed")
            assert self.loaded is not None  # set before _dead is cleared
            return self.loaded

    def add(self, stream: RequestStream) -> None:
        """Queue a request; EngineDeadError when not serving, QueueFullError when max_queue are waiting."""
        with self._cond:
            if self._dead is not None or self._closing:
                raise EngineDeadError(self._dead or "engine closed")
            if len(self._waiting) >= self._settings.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            self._waiting.push(stream)
            self._open.add(stream)
            self._cond.notify()

    def remove(self, stream: RequestStream) -> None:
        """The request left (answered, failed or abandoned): out of the queue; the batch drops it at its next step."""
        stream.cancelled = True
        with self._cond:
            self._open.discard(stream)
            self._waiting.forget(stream)

    def stop(self) -> None:
        """Ask the worker to finish its step and shut down."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def unload(self) -> None:
        """Let go of the model (after the worker has ended)."""
        self.loaded = None

    # --- the worker thread ---------------------------------------------------------------------------------

    def load(self) -> LoadedModel:
        """Load the model (and compile its steps, if asked); requests are taken from here on. Raises what
        loading raised."""
        try:
            loaded = self._load()
            if self._settings.compile != "off":
                self._compiled = CompiledSteps(loaded.model, prefill=self._settings.compile == "all")
                with torch.inference_mode():
                    self._compiled.warm_up()
        except BaseException as exc:
            with self._cond:
                self._dead = f"model failed to load: {exc!r}"
            raise
        self.loaded = loaded
        with self._cond:
            self._dead = None
        return loaded

    def serve(self) -> None:
        """Serve until stopped; if the loop dies, every open stream gets EngineDeadError."""
        reason = "engine closed"
        try:
            self._serve()
        except BaseException as exc:
            log.critical("engine worker died; every stream now fails", exc_info=True)
            reason = f"engine worker died: {exc!r}"
        finally:
            if self._runner is not None:
                self._served, self._runner = self._runner.stats, None
            self.shut_down(reason)

    def shut_down(self, reason: str) -> None:
        """Take no more requests; end every open stream with EngineDeadError(reason)."""
        with self._cond:
            self._dead = reason
            streams = list(self._open)
            self._waiting.clear()
        for stream in streams:
            stream.finish(EngineDeadError(reason))

    def _serve(self) -> None:
        assert self.loaded is not None
        m = self.loaded
        runner = ModelRunner(
            m.model, m.tokenizer, eos_ids=m.eos_ids, pad_id=m.pad_id, sessions=self.sessions, compiled=self._compiled
        )
        self._runner = runner
        # One inference mode around the whole loop: the caches it makes are reshaped between steps too.
        with torch.inference_mode():
            while (joining := self._next_joining(runner)) is not None:
                if joining:
                    self._admit(runner, joining)
                if self._closing:
                    return
                if runner.rows:
                    self._step(runner)

    def _next_joining(self, runner: ModelRunner) -> list[RequestStream] | None:
        """Requests that join the batch now (waiting only while nothing runs); None when closing."""
        s = self._settings
        with self._cond:
            while not self._waiting and not runner.rows and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            joining: list[RequestStream] = []
            width = 0
            while self._waiting and len(runner.rows) + len(joining) < s.max_batch_size:
                stream = self._waiting.peek()
                ids = stream.prompt_ids
                new = len(ids) - self.sessions.reusable(stream.request.session_id, ids)
                # The prefill pads every joining prompt to the longest new part: cap that padded size.
                if joining and max(width, new) * (len(joining) + 1) > s.max_batch_tokens:
                    break
                width = max(width, new)
                joining.append(self._waiting.pop())
            return joining

    def _admit(self, runner: ModelRunner, streams: list[RequestStream]) -> None:
        streams = [stream for stream in streams if not stream.cancelled]
        if not streams:
            return
        try:
            runner.admit(streams)
        except Exception as exc:
            log.exception("prefill failed for %d joining requests", len(streams))
            _fail(streams, exc)
        else:
            return
        free_cached_memory()  # outside the handler: the traceback held the failed step's tensors

    def _step(self, runner: ModelRunner) -> None:
        try:
            runner.step()
        except Exception as exc:
            rows = runner.drop_all()
            log.exception("decode step failed for a batch of %d requests", len(rows))
            _fail([row.stream for row in rows], exc)
        else:
            return
        free_cached_memory()


def _fail(streams: Sequence[RequestStream], exc: Exception) -> None:
    # An out-of-memory that reaches here was not cured by splitting the batch (model_runner.py), or struck outside
    # a forward call (the batch's KV buffers growing): say so rather than "the model failed".
    error_type = ModelOutOfMemoryError if isinstance(exc, torch.OutOfMemoryError) else GenerationFailedError
    for stream in streams:
        error = error_type(f"the model raised {exc!r}")
        error.__cause__ = exc
        stream.finish(error)
