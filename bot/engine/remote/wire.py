"""The OpenAI HTTP API as it goes over the wire: request bodies each server takes, streamed chunks (server-sent
events), error bodies, Retry-After and /v1/models."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from bot.engine.base import SamplingParams

DONE = "[DONE]"

# Fields beyond the OpenAI schema, or ones a server may not take: left out for a server that refuses them (answered
# with transformers serve's `422 Unexpected fields in the request: {...}`), as the answer is still a good one.
OPTIONAL_FIELDS = frozenset({"top_p", "repetition_penalty", "repeat_penalty", "min_tokens"})
_UNEXPECTED = re.compile(r"Unexpected fields in the request: \{([^}]*)\}")

# Keys under which servers report their context window in /v1/models (vLLM, and others that copy it).
_CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length")


class StreamError(Exception):
    """The server broke off the stream or sent something that is not a completion chunk."""


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each event, in order (multi-line data joined with newlines, as the SSE spec says)."""
    lines: list[str] = []
    async for raw in content:
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise StreamError(f"not UTF-8: {raw[:200]!r}") from exc
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue  # a comment, sent as a keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed piece: answer text, reasoning the server keeps apart from it, and the finish reason once the
    server gives one ("stop", "length", ...)."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None


async def completion_deltas(content: aiohttp.StreamReader, *, chat: bool) -> AsyncIterator[Delta]:
    """The deltas of a streamed `/completions` or `/chat/completions` answer (empty ones left out).

    Raises StreamError when the server reports an error in the stream or the stream ends before the server said
    it was done (a `finish_reason` or `[DONE]`): an answer cut short must not pass for a whole one.
    """
    finished = False
    async for data in sse_data(content):
        if data == DONE:
            return
        try:
            chunk: Any = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StreamError(f"not JSON: {data[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise StreamError(f"not a completion chunk: {data[:200]!r}")
        if chunk.get("error"):
            raise StreamError(f"the server reported: {chunk['error']}")
        for choice in chunk.get("choices") or ():
            delta = _delta(choice, chat=chat)
            if delta.text or delta.reasoning or delta.finish_reason:
                yield delta
            if delta.finish_reason:
                finished = True
    if not finished:
        raise StreamError("the stream ended before the answer was finished")


def _delta(choice: Any, *, chat: bool) -> Delta:
    if not isinstance(choice, dict):
        raise StreamError(f"not a completion choice: {str(choice)[:200]!r}")
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) and finish else None
    if not chat:
        return Delta(_text(choice.get("text")), finish_reason=finish)
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise StreamError(f"not a completion delta: {str(delta)[:200]!r}")
    # Reasoning kept out of `content`: `reasoning_content` (DeepSeek's API, vLLM's reasoning parsers) or
    # `reasoning` (newer vLLM, OpenRouter).
    reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
    return Delta(_text(delta.get("content")), reasoning, finish)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def context_length_from_listing(listing: Any, model_name: str) -> int | None:
    """The context window a /v1/models answer gives for `model_name` (or for its only model), if any."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [e for e in entries if isinstance(e, dict)]
    ours = [e for e in entries if e.get("id") == model_name] or (entries if len(entries) == 1 else [])
    for entry in ours:
        for key in _CONTEXT_KEYS:
            value = entry.get(key)
            if isinstance(value, int) and value > 0:
                return value
        meta = entry.get("meta")  # llama.cpp's server
        if isinstance(meta, dict):
            for key in ("n_ctx", "n_ctx_train"):
                value = meta.get(key)
                if isinstance(value, int) and value > 0:
                    return value
    return None


def request_body(
    model: str,
    sampling: SamplingParams,
    prompt: dict[str, Any],
    *,
    llama_cpp: bool = False,
    refused: Collection[str] = (),
) -> dict[str, Any]:
    """The JSON body of a streamed completion: `prompt` holds "prompt" or "messages"; `refused` are optional fields
    the server said it does not take."""
    body: dict[str, Any] = {
        "model": model,
        **prompt,
        "stream": True,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
    }
    if not sampling.greedy:
        body["top_p"] = sampling.top_p
    if sampling.repetition_penalty != 1.0:
        # vLLM's extension (transformers' name); llama.cpp's server reads only its own name and ignores this one.
        body["repeat_penalty" if llama_cpp else "repetition_penalty"] = sampling.repetition_penalty
    if sampling.min_new_tokens:
        body["min_tokens"] = sampling.min_new_tokens  # vLLM's extension too; llama.cpp's server ignores it
    for field in refused:
        body.pop(field, None)
    return body


def unexpected_fields(error_body: str) -> frozenset[str]:
    """The optional fields an error body says the server does not take (transformers serve's 422 names them)."""
    found = _UNEXPECTED.search(error_body)
    if found is None:
        return frozenset()
    return frozenset(re.findall(r"'([^']+)'", found[1])) & OPTIONAL_FIELDS


def context_overflow(error_body: str) -> tuple[int, int] | None:
    """(prompt tokens, context size) from llama.cpp's `exceed_context_size_error` (a slot smaller than the prompt)."""
    try:
        parsed: Any = json.loads(error_body)
    except json.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or error.get("type") != "exceed_context_size_error":
        return None
    prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
    if not isinstance(prompt, int) or not isinstance(context, int):
        return None
    return prompt, context


def served_by_llama_cpp(listing: Any) -> bool:
    """Whether a /v1/models answer comes from llama.cpp's server (it says `"owned_by": "llamacpp"`)."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    return isinstance(entries, list) and any(isinstance(e, dict) and e.get("owned_by") == "llamacpp" for e in entries)
