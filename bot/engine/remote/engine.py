"""RemoteEngine: the engine interface over an OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp, Ollama, ...).

The prompt's type picks the endpoint: a TokenPrompt (our own Meta-exact LLaMA-2 prompt, say) goes to
`/v1/completions` as token IDs, or as text that re-tokenizes to them for servers that take only text; a
MessagePrompt goes to `/v1/chat/completions`, and the server applies the model's template. client.py speaks to
one server at a time and learns what each one takes.

Failures before the first token (connection refused, timeouts, 429, 5xx) are retried with exponential backoff and
jitter, on another replica when there is one; after the first token a failure ends the stream with
ServerBrokeOffError, since half an answer cannot be taken back from the user. Reasoning tokens count: trying again
would make a thinking model think it all over while the user waits without a word.

A thinking model's reasoning never reaches the chat layer (reasoning.py takes it out, or shows it as a spoiler line
with `[model] show_reasoning`). A stream that ends with reasoning and no answer, or with an empty answer at
finish_reason "length", is ThoughtWithoutAnswerError; an answer cut at "length" stands, as max_new_tokens allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from bot.engine.base import Engine, EngineStats, GenerationRequest, MessagePrompt
from bot.engine.remote.client import Retryable, ServerClient
from bot.engine.remote.reasoning import ReasoningFilter
from bot.engine.remote.replicas import Replica, ReplicaPool
from bot.engine.remote.wire import Delta, context_length_from_listing
from bot.errors import (
    ConfigError,
    EngineDeadError,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    ServerBrokeOffError,
    ServerUnreachableError,
    ThoughtWithoutAnswerError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.config import ModelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before the first token arrives."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    # A Retry-After longer than this is cut short: a chat user will not wait minutes for an answer.
    max_retry_after: float = 30.0
    # How long a replica that refused a connection is left out before requests try it again.
    cooldown: float = 30.0
    connect_timeout: float = 10.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Exponential, with "equal jitter": replicas that failed together do not all come back at once."""
        cap = min(self.max_delay, self.base_delay * 2**retry)
        return rng.uniform(cap / 2, cap)


class RemoteEngine(Engine):
    """Streams answers from one or more OpenAI-compatible servers; `base_url` lists the replicas.

    `stats.tokens_generated` counts streamed chunks: vLLM, TGI, llama.cpp's server and transformers serve send one
    chunk per token."""

    accepts_messages = True

    def __init__(
        self,
        settings: ModelSettings,
        *,
        api_key: str | None,
        hf_token: str | None = None,
        retry: RetryPolicy | None = None,
        config_source: Path | str = "<config>",
    ) -> None:
        self.settings = settings
        self.model_name = settings.name
        self.context_length = settings.context_length or 0  # learned in start() otherwise
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.retry = retry or RetryPolicy()
        self.pool = ReplicaPool(settings.base_url, cooldown=self.retry.cooldown)
        self._api_key = api_key
        self._hf_token = hf_token
        self._source = config_source
        self._client: ServerClient | None = None
        self._dead: str | None = "engine not started"
        self._in_flight = 0
        self._rng = random.Random()
        self._stats = EngineStats()
        self._tokens = 0

    @property
    def waiting(self) -> int:
        return 0  # requests queue on the servers, not here

    @property
    def running(self) -> int:
        return self._in_flight

    @property
    def stats(self) -> EngineStats:
        """`requests` sent; each is its own batch here, and `largest_batch` is the most in flight at once."""
        return dataclasses.replace(self._stats, tokens_generated=self._tokens)

    async def start(self) -> None:
        if self._client is not None:
            raise RuntimeError("RemoteEngine.start() called twice")
        self.tokenizer = await asyncio.to_thread(self._load_tokenizer)
        self._client = ServerClient(
            model_name=self.model_name,
            pool=self.pool,
            tokenizer=self.tokenizer,
            headers={"Authorization": f"Bearer {self._api_key}"} if self._api_key else None,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.retry.connect_timeout, sock_read=self.settings.request_timeout
            ),
            listing_timeout=self.retry.connect_timeout,
        )
        try:
            self.context_length = await self._learn_context_length(self._client)
        except BaseException:
            await self._client.close()
            raise
        self._dead = None
        log.info(
            "remote model %s on %s: context %d tokens, tokenizer %s",
            self.model_name,
            ", ".join(r.url for r in self.pool.replicas),
            self.context_length,
            "loaded" if self.tokenizer is not None else "not available",
        )

    async def close(self) -> None:
        self._dead = "engine closed"
        # Open streams fail at once (then EngineDeadError), and the servers stop generating.
        if self._client is not None:
            await self._client.close()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[str, None]:
        self._admit(request)
        self._in_flight += 1
        self._stats = dataclasses.replace(
            self._stats,
            batches=self._stats.batches + 1,
            requests=self._stats.requests + 1,
            largest_batch=max(self._stats.largest_batch, self._in_flight),
        )
        answer = ReasoningFilter(show=self.settings.show_reasoning)
        try:
            # aclosing: a consumer that leaves closes the inner streams (and so the connection) now, not at GC.
            async with contextlib.aclosing(self._with_retries(request)) as deltas:
                async for delta in deltas:
                    if delta.text or delta.reasoning:
                        self._tokens += 1
                    text = answer.feed(delta)
                    if text:
                        yield text
            rest = answer.finish()
            if rest:
                yield rest
        finally:
            self._in_flight -= 1
        if not answer.answered and (answer.thought or answer.finish_reason == "length"):
            # Without reasoning, an empty answer at "stop" is the model's own choice and stands (shown as empty).
            log.info(
                "no answer within max_new_tokens (finish %s, %d characters of reasoning)",
                answer.finish_reason,
                len(answer.reasoning),
            )
            raise ThoughtWithoutAnswerError(f"finish_reason {answer.finish_reason}, no answer after the reasoning")
        if request.on_finish is not None:
            request.on_finish("length" if answer.finish_reason == "length" else "stop")

    # --- start-up ------------------------------------------------------------------------------------------

    async def _learn_context_length(self, client: ServerClient) -> int:
        """The context window: from settings, the servers' /v1/models, or the model's config beside the tokenizer.

        /v1/models is read even when settings give the window: it also says which servers are llama.cpp's."""
        s = self.settings
        listings = await client.listings()
        context = s.context_length or next(
            (n for listing in listings if (n := context_length_from_listing(listing, self.model_name))), None
        )
        if not context:
            context = await asyncio.to_thread(self._local_context_length)
        if not context:
            raise ConfigError(
                self._source,
                "model.context_length",
                f"is not set, and neither the servers' /v1/models nor a local config of {s.name} gives it: "
                "set model.context_length to the server's context window",
            )
        if s.max_new_tokens >= context:
            raise ConfigError(
                self._source, "model.max_new_tokens", f"must be smaller than the context window ({context} tokens)"
            )
        return context

    def _load_tokenizer(self) -> PreTrainedTokenizerBase | None:
        from transformers import AutoTokenizer

        source = self.settings.tokenizer or self.settings.name
        try:
            return AutoTokenizer.from_pretrained(source, token=self._hf_token)
        except Exception as exc:
            if self.settings.tokenizer:  # asked for by name: a mistake to report, not to work around
                raise ConfigError(
                    self._source, "model.tokenizer", f"cannot load a tokenizer from {source}: {exc}"
                ) from exc
            log.warning("no tokenizer for %s (%s); prompts go to the server as messages", source, exc)
            return None

    def _local_context_length(self) -> int | None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.settings.tokenizer or self.settings.name, token=self._hf_token)
        except Exception:
            return None
        value = getattr(config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    # --- requests ------------------------------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._in_flight >= self.settings.max_queue:
            raise QueueFullError(f"{self._in_flight} requests already in flight")
        prompt = request.prompt
        if isinstance(prompt, MessagePrompt):
            if not prompt.messages:
                raise InvalidPromptError("empty prompt")
            return  # the server templates and counts it; bot/render.py fitted it
        if not prompt.ids:
            raise InvalidPromptError("empty prompt")
        limit = self.context_length - request.sampling.max_new_tokens
        if len(prompt.ids) > limit:
            raise PromptTooLongError(len(prompt.ids), max(limit, 0))

    async def _with_retries(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        tries = 0
        tried: list[Replica] = []
        while True:
            replica = self.pool.pick(avoid=tried)
            started = False
            try:
                async with contextlib.aclosing(self._require_client().stream(replica, request)) as deltas:
                    async for delta in deltas:
                        started = True
                        yield delta
                return
            except Retryable as exc:
                if self._dead is not None:
                    raise EngineDeadError(self._dead) from exc
                if started:
                    log.warning("model server %s broke off an answer: %s", replica.url, exc)
                    raise ServerBrokeOffError(f"{replica.url}: {exc}") from exc
                tries += 1
                tried.append(replica)
                if tries >= self.retry.attempts:
                    log.error("giving up after %d tries; last from %s: %s", tries, replica.url, exc)
                    raise ServerUnreachableError(f"{replica.url}: {exc}") from exc
                # A refused connection moves on to another live replica at once; anything else waits.
                delay = 0.0 if exc.refused and self.pool.any_live else self.retry.backoff(tries - 1, self._rng)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.retry.max_retry_after))
                log.warning("model server %s: %s; try %d in %.2f s", replica.url, exc, tries + 1, delay)
                await asyncio.sleep(delay)

    def _require_client(self) -> ServerClient:
        if self._client is None:
            raise EngineDeadError("engine not started")
        return self._client
