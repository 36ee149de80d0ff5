"""RemoteEngine: the engine interface over an OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp, Ollama, ...).

LLaMA-2 models get our own Meta-exact prompt through `/v1/completions`: as the token-ID list when the server takes
one (vLLM and llama.cpp's server do; nothing is re-tokenized), else as text rebuilt so that the server's tokenizer
gives back the same IDs (transformers serve and TGI take only text). Other models go through `/v1/chat/completions`
with the request's messages, and the server applies the model's chat template.

Failures before the first token (connection refused, timeouts, 429, 5xx) are retried with exponential backoff and
jitter, on another replica when there is one; after the first token a failure ends the stream with
GenerationFailedError, since half an answer cannot be taken back from the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bot.engine.base import Engine, EngineStats, GenerationRequest
from bot.engine.openai_wire import StreamError, completion_deltas, context_length_from_listing, retry_after_seconds
from bot.engine.replicas import Replica, ReplicaPool
from bot.engine.text_prompt import prompt_text, tokenizer_adds_bos
from bot.errors import ConfigError, EngineDeadError, GenerationFailedError, PromptTooLongError, QueueFullError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.config import ModelSettings

log = logging.getLogger(__name__)

UNREACHABLE = "The model server is not answering right now; please try again in a moment."
BROKE_OFF = "The model server stopped in the middle of the answer; please try again."
REFUSED = "The model server refused this request; an operator should check its log."


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


class _Retryable(Exception):
    """A failure worth another try, as long as nothing reached the consumer yet."""

    def __init__(self, detail: str, *, refused: bool = False, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.refused = refused
        self.retry_after = retry_after


class RemoteEngine(Engine):
    """Streams answers from one or more OpenAI-compatible servers; `base_url` lists the replicas."""

    # One streamed chunk is one token: vLLM, TGI, llama.cpp's server and transformers serve send a chunk per token.
    counts_tokens = True

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
        self._session: aiohttp.ClientSession | None = None
        self._dead: str | None = "engine not started"
        self._llama2 = False
        self._tokenizer_adds_bos = False
        self._in_flight = 0
        self._responses: set[aiohttp.ClientResponse] = set()
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

    @property
    def uses_completions(self) -> bool:
        """True when prompts go to `/v1/completions` as our own token IDs (LLaMA-2), False for the chat endpoint."""
        return self._llama2

    async def start(self) -> None:
        if self._session is not None:
            raise RuntimeError("RemoteEngine.start() called twice")
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.retry.connect_timeout, sock_read=self.settings.request_timeout
        )
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        try:
            await self._learn_model()
        except BaseException:
            await self._session.close()
            raise
        self._dead = None
        log.info(
            "remote model %s on %s: context %d tokens, %s, tokenizer %s",
            self.model_name,
            ", ".join(r.url for r in self.pool.replicas),
            self.context_length,
            "LLaMA-2 prompts through /completions" if self._llama2 else "messages through /chat/completions",
            "loaded" if self.tokenizer is not None else "not available",
        )

    async def close(self) -> None:
        self._dead = "engine closed"
        # Closing the connections makes every open stream fail at once (then EngineDeadError) and tells the
        # servers to stop generating.
        for response in list(self._responses):
            response.close()
        if self._session is not None:
            await self._session.close()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        chat = self._admit(request)
        self._in_flight += 1
        self._stats = dataclasses.replace(
            self._stats,
            batches=self._stats.batches + 1,
            requests=self._stats.requests + 1,
            largest_batch=max(self._stats.largest_batch, self._in_flight),
        )
        try:
            # aclosing: a consumer that leaves closes the inner streams (and so the connection) now, not at GC.
            async with contextlib.aclosing(self._with_retries(request, chat)) as deltas:
                async for delta in deltas:
                    self._tokens += 1
                    yield delta
        finally:
            self._in_flight -= 1

    # --- start-up ------------------------------------------------------------------------------------------

    async def _learn_model(self) -> None:
        s = self.settings
        self.tokenizer = await asyncio.to_thread(self._load_tokenizer)
        self._llama2 = self._wants_llama2()
        if self._llama2 and self.tokenizer is None:
            raise ConfigError(
                self._source,
                "model.tokenizer",
                f"the LLaMA-2 prompt of {s.name} is built from token IDs, so its tokenizer is needed: set "
                "model.tokenizer to a folder or hub ID holding it",
            )
        if self.tokenizer is not None:
            self._tokenizer_adds_bos = tokenizer_adds_bos(self.tokenizer)
        context = s.context_length or await self._server_context_length()
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
        self.context_length = context

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

    def _wants_llama2(self) -> bool:
        # The same choice as bot.prompt.select_format, so the IDs bot/chat.py builds match the endpoint.
        fmt = self.settings.prompt_format
        if fmt != "auto":
            return fmt == "llama2"
        name = self.settings.name.lower()
        if "llama-2" in name or "llama2" in name:
            return True
        return self.tokenizer is not None and not self.tokenizer.chat_template

    async def _server_context_length(self) -> int | None:
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(total=self.retry.connect_timeout)
        for replica in self.pool.replicas:
            try:
                async with session.get(f"{replica.url}/models", timeout=timeout) as response:
                    response.raise_for_status()
                    listing: Any = await response.json(content_type=None)
            except aiohttp.ClientConnectorError as exc:
                self.pool.mark_dead(replica)
                log.warning("model server %s: %s", replica.url, exc)
                continue
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("model server %s: no usable /v1/models (%r)", replica.url, exc)
                continue
            context = context_length_from_listing(listing, self.model_name)
            if context:
                return context
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

    def _admit(self, request: GenerationRequest) -> bool:
        """Check the request; True when it goes to the chat endpoint."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._in_flight >= self.settings.max_queue:
            raise QueueFullError(f"{self._in_flight} requests already in flight")
        chat = request.messages is not None and not self._llama2
        if not (request.messages if chat else request.prompt_ids):
            raise ValueError("empty prompt")
        if request.prompt_ids:
            limit = self.context_length - request.sampling.max_new_tokens
            if len(request.prompt_ids) > limit:
                raise PromptTooLongError(len(request.prompt_ids), max(limit, 0))
        return chat

    async def _with_retries(self, request: GenerationRequest, chat: bool) -> AsyncIterator[str]:
        tries = 0
        tried: list[Replica] = []
        while True:
            replica = self.pool.pick(avoid=tried)
            started = False
            try:
                async with contextlib.aclosing(self._attempt(replica, request, chat)) as deltas:
                    async for delta in deltas:
                        started = True
                        yield delta
                return
            except _Retryable as exc:
                if self._dead is not None:
                    raise EngineDeadError(self._dead) from exc
                if started:
                    log.warning("model server %s broke off an answer: %s", replica.url, exc)
                    raise GenerationFailedError(f"{replica.url}: {exc}", user_message=BROKE_OFF) from exc
                tries += 1
                tried.append(replica)
                if tries >= self.retry.attempts:
                    log.error("giving up after %d tries; last from %s: %s", tries, replica.url, exc)
                    raise GenerationFailedError(f"{replica.url}: {exc}", user_message=UNREACHABLE) from exc
                # A refused connection moves on to another live replica at once; anything else waits.
                delay = 0.0 if exc.refused and self.pool.any_live else self.retry.backoff(tries - 1, self._rng)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.retry.max_retry_after))
                log.warning("model server %s: %s; try %d in %.2f s", replica.url, exc, tries + 1, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, replica: Replica, request: GenerationRequest, chat: bool) -> AsyncIterator[str]:
        replica.in_flight += 1
        replica.sent += 1
        try:
            response = await self._open(replica, request, chat)
            self._responses.add(response)
            finished = False
            try:
                await _check_status(replica, response)
                async for delta in completion_deltas(response.content, chat=chat):
                    yield delta
                finished = True
            except (aiohttp.ClientError, TimeoutError, StreamError) as exc:
                raise _Retryable(f"stream failed: {exc!r}") from exc
            finally:
                self._responses.discard(response)
                if finished:
                    response.release()
                else:
                    # Left early (break, cancel, error): closing the connection is how the server learns to
                    # stop generating; releasing it to the pool would read the rest of the answer first.
                    response.close()
        finally:
            replica.in_flight -= 1

    async def _open(self, replica: Replica, request: GenerationRequest, chat: bool) -> aiohttp.ClientResponse:
        if chat:
            assert request.messages is not None
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            return await self._post(replica, "chat/completions", self._body(request, messages=messages))
        if replica.accepts_token_ids is False and self.tokenizer is not None:
            return await self._post(replica, "completions", self._body(request, prompt=await self._text(request)))
        response = await self._post(replica, "completions", self._body(request, prompt=list(request.prompt_ids)))
        if response.status == 200:
            replica.accepts_token_ids = True
        elif response.status in (400, 422) and replica.accepts_token_ids is None and self.tokenizer is not None:
            detail = await _error_detail(response)
            response.release()
            log.info("model server %s does not take token IDs (%s); sending prompts as text", replica.url, detail)
            response = await self._post(replica, "completions", self._body(request, prompt=await self._text(request)))
            if response.status == 200:
                replica.accepts_token_ids = False
        return response

    async def _post(self, replica: Replica, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        session = self._require_session()
        try:
            response = await session.post(f"{replica.url}/{path}", json=body)
        except aiohttp.ClientConnectorError as exc:
            self.pool.mark_dead(replica)
            raise _Retryable(f"cannot connect: {exc}", refused=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"request failed: {exc!r}") from exc
        self.pool.mark_alive(replica)
        return response

    def _body(self, request: GenerationRequest, **prompt: Any) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model_name,
            **prompt,
            "stream": True,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
        }
        if not s.greedy:
            body["top_p"] = s.top_p
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty  # vLLM's extension; others ignore the key
        if s.min_new_tokens:
            body["min_tokens"] = s.min_new_tokens  # vLLM's extension too
        return body

    async def _text(self, request: GenerationRequest) -> str:
        assert self.tokenizer is not None
        return await asyncio.to_thread(prompt_text, self.tokenizer, request.prompt_ids, self._tokenizer_adds_bos)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineDeadError("engine not started")
        return self._session


async def _check_status(replica: Replica, response: aiohttp.ClientResponse) -> None:
    status = response.status
    if status == 200:
        return
    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    detail = await _error_detail(response)
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}: {detail}", retry_after=retry_after)
    log.error("model server %s refused a request: HTTP %d: %s", replica.url, status, detail)
    raise GenerationFailedError(f"{replica.url} answered HTTP {status}: {detail}", user_message=REFUSED)


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    try:
        text = await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
        return f"(unreadable body: {exc!r})"
    return " ".join(text.split())[:300]
