"""HTTP to the model servers: one try of one request on one replica, and what each server tells us on the way.

The prompt's type picks the endpoint: a TokenPrompt goes to `/v1/completions`, as token IDs or (for a server that
takes only text) as text that its tokenizer turns back into the same IDs; a MessagePrompt goes to
`/v1/chat/completions`. Servers differ in what else they take, and say so; each answer below is kept on the replica
and the request sent again at once, so only a server's first request pays for it:
- `422 Unexpected fields in the request: {...}` (transformers serve, for min_tokens and repetition_penalty): the
  fields named are left out from then on (logged once, at INFO);
- a 400 or 422 to a token-ID prompt (transformers serve, TGI): prompts go to it as text from then on;
- llama.cpp's server (seen in /v1/models at start-up) names the repetition penalty `repeat_penalty`.
A keep-alive connection the server closed just as a request went out on it fails before any answer; the request
goes again once, at once and quietly, on a fresh connection. A llama.cpp slot smaller than the prompt answers
`exceed_context_size_error`, which becomes PromptTooLongError (and one WARNING naming the server's limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp

from bot.engine.base import MessagePrompt, TokenPrompt
from bot.engine.remote.reasoning import without_shown_reasoning
from bot.engine.remote.text_prompt import prompt_text, tokenizer_adds_bos
from bot.engine.remote.wire import (
    Delta,
    StreamError,
    completion_deltas,
    context_overflow,
    request_body,
    retry_after_seconds,
    served_by_llama_cpp,
    unexpected_fields,
)
from bot.errors import EngineDeadError, PromptTooLongError, ServerRefusedError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bot.engine.base import GenerationRequest
    from bot.engine.remote.replicas import Replica, ReplicaPool

log = logging.getLogger(__name__)


class Retryable(Exception):
    """A failure worth another try, as long as nothing reached the consumer yet."""

    def __init__(self, detail: str, *, refused: bool = False, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.refused = refused
        self.retry_after = retry_after


class ServerClient:
    """The HTTP sessions to the replicas of `pool`; used on the event loop only."""

    def __init__(
        self,
        *,
        model_name: str,
        pool: ReplicaPool,
        tokenizer: PreTrainedTokenizerBase | None,
        headers: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout,
        listing_timeout: float,
    ) -> None:
        self._model_name = model_name
        self._listing_timeout = aiohttp.ClientTimeout(total=listing_timeout)
        self._pool = pool
        self._tokenizer = tokenizer
        self._adds_bos = tokenizer is not None and tokenizer_adds_bos(tokenizer)
        reuse = aiohttp.TraceConfig()
        reuse.on_connection_reuseconn.append(_note_reuse)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, trace_configs=[reuse])
        # Never pooled: the second send of a request whose pooled connection turned out closed.
        self._fresh = aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)
        )
        self._responses: set[aiohttp.ClientResponse] = set()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        # Closing the connections makes every open stream fail at once and tells the servers to stop generating.
        for response in list(self._responses):
            response.close()
        await self._session.close()
        await self._fresh.close()

    async def listings(self) -> list[Any]:
        """Every replica's /v1/models answer (None where there is none), noting which are llama.cpp's."""
        listings = await asyncio.gather(*(self._listing(replica) for replica in self._pool.replicas))
        for replica, listing in zip(self._pool.replicas, listings, strict=True):
            replica.llama_cpp = served_by_llama_cpp(listing)
        return listings

    async def _listing(self, replica: Replica) -> Any:
        try:
            async with self._session.get(f"{replica.url}/models", timeout=self._listing_timeout) as response:
                response.raise_for_status()
                return await response.json(content_type=None)
        except aiohttp.ClientConnectorError as exc:
            self._pool.mark_dead(replica)
            log.warning("model server %s: %s", replica.url, exc)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("model server %s: no usable /v1/models (%r)", replica.url, exc)
        return None

    async def stream(self, replica: Replica, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """The answer's deltas from `replica`, reasoning included. Raises Retryable for what another try may cure, and
        ServerRefusedError or PromptTooLongError for what it cannot."""
        replica.in_flight += 1
        replica.sent += 1
        try:
            response = await self._open(replica, request)
            self._responses.add(response)
            finished = False
            try:
                chat = isinstance(request.prompt, MessagePrompt)
                async for delta in completion_deltas(response.content, chat=chat):
                    yield delta
                finished = True
            except (aiohttp.ClientError, TimeoutError, StreamError) as exc:
                raise Retryable(f"stream failed: {exc!r}") from exc
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

    async def _open(self, replica: Replica, request: GenerationRequest) -> aiohttp.ClientResponse:
        """A 200 response to `request`, sent again at once for each thing the server taught us on the way."""
        prompt = request.prompt
        as_text = isinstance(prompt, TokenPrompt) and replica.accepts_token_ids is False and self._can_write_text
        while True:
            path, body = await self._request(replica, request, as_text=as_text)
            response = await self._post(replica, path, body)
            if response.status == 200:
                if isinstance(prompt, TokenPrompt) and replica.accepts_token_ids is None:
                    replica.accepts_token_ids = not as_text
                return response
            status, retry_after = response.status, retry_after_seconds(response.headers.get("Retry-After"))
            text = await _read_body(response)
            response.release()
            detail = " ".join(text.split())[:300]
            overflow = context_overflow(text)
            if overflow is not None:
                raise self._too_long(replica, request, *overflow)
            if status == 429 or status >= 500:
                raise Retryable(f"HTTP {status}: {detail}", retry_after=retry_after)
            refused = unexpected_fields(text) - replica.refused_fields
            if refused:
                log.info("model server %s does not take %s; leaving them out", replica.url, ", ".join(sorted(refused)))
                replica.refused_fields |= refused
                continue
            if (
                isinstance(prompt, TokenPrompt)
                and not as_text
                and replica.accepts_token_ids is None
                and self._can_write_text
                and status in (400, 422)
            ):
                log.info("model server %s does not take token IDs (%s); sending prompts as text", replica.url, detail)
                as_text = True
                continue
            log.error("model server %s refused a request: HTTP %d: %s", replica.url, status, detail)
            raise ServerRefusedError(f"{replica.url} answered HTTP {status}: {detail}")

    @property
    def _can_write_text(self) -> bool:
        return self._tokenizer is not None

    async def _request(
        self, replica: Replica, request: GenerationRequest, *, as_text: bool
    ) -> tuple[str, dict[str, Any]]:
        """The endpoint and body of `request` as `replica` takes it."""
        prompt = request.prompt
        fields: dict[str, Any]
        if isinstance(prompt, MessagePrompt):
            # Reasoning shown in Discord is part of the stored answer; the model gets its answers without it.
            messages = [
                {"role": m.role, "content": without_shown_reasoning(m.content) if m.role == "assistant" else m.content}
                for m in prompt.messages
            ]
            path, fields = "chat/completions", {"messages": messages}
            if prompt.continues_answer:
                # vLLM's fields; llama.cpp's server continues a last assistant message without being told.
                fields |= {"continue_final_message": True, "add_generation_prompt": False}
        elif as_text:
            assert self._tokenizer is not None
            text = await asyncio.to_thread(prompt_text, self._tokenizer, prompt.ids, self._adds_bos)
            path, fields = "completions", {"prompt": text}
        else:
            path, fields = "completions", {"prompt": list(prompt.ids)}
        body = request_body(
            self._model_name, request.sampling, fields, llama_cpp=replica.llama_cpp, refused=replica.refused_fields
        )
        return path, body

    async def _post(self, replica: Replica, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        url = f"{replica.url}/{path}"
        sent = SimpleNamespace(reused=False)
        try:
            try:
                response = await self._send(self._session, url, body, sent)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) or not sent.reused:
                    raise
                # The server closed this idle keep-alive connection as the request went out: nothing was answered.
                log.debug("model server %s closed a pooled connection (%r); sending again", replica.url, exc)
                response = await self._send(self._fresh, url, body, sent)
        except aiohttp.ClientConnectorError as exc:
            self._pool.mark_dead(replica)
            raise Retryable(f"cannot connect: {exc}", refused=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"request failed: {exc!r}") from exc
        self._pool.mark_alive(replica)
        return response

    async def _send(
        self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], sent: SimpleNamespace
    ) -> aiohttp.ClientResponse:
        if self._closed:
            raise EngineDeadError("engine closed")
        return await session.post(url, json=body, trace_request_ctx=sent)

    def _too_long(self, replica: Replica, request: GenerationRequest, prompt_tokens: int, n_ctx: int) -> Exception:
        if not replica.told_context:
            replica.told_context = True
            log.warning(
                "model server %s holds %d tokens per request (its n_ctx), fewer than this prompt's %d: prompts and "
                "answers must fit that (set model.context_length to it, or give the server a larger context)",
                replica.url,
                n_ctx,
                prompt_tokens,
            )
        return PromptTooLongError(prompt_tokens, max(n_ctx - request.sampling.max_new_tokens, 0))


async def _note_reuse(session: aiohttp.ClientSession, context: SimpleNamespace, params: object) -> None:
    context.trace_request_ctx.reused = True


async def _read_body(response: aiohttp.ClientResponse) -> str:
    try:
        return await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
        return f"(unreadable body: {exc!r})"
