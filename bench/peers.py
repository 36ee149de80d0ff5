"""Peers: the engines people would run instead (llama.cpp's `llama-server`, vLLM, ...), reached over the OpenAI HTTP
API and measured the way the benchmark measures ours.

Each request is streamed from `/v1/completions`, greedy (temperature 0), with the prompt as token IDs where the
server takes them (both llama.cpp and vLLM do): then the server sees exactly the tokens our engine sees, not a
re-tokenization of their text. An answer held to a length asks for it with `min_tokens` (vLLM) and `ignore_eos`
(llama.cpp, vLLM); a field the server refuses is left out from then on, as is the token-ID prompt (the prompt's
text goes instead). Tokens are counted from the server's `usage` when it reports one, else by encoding the answer
with our tokenizer, as our side is counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.workloads import Answer
from bot.engine.remote.wire import sse_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Fields not every server takes; one the server names in its refusal is dropped for the rest of the run.
OPTIONAL = ("min_tokens", "ignore_eos", "stream_options")


class PeerError(RuntimeError):
    """A peer refused a request in a way leaving fields out does not cure, or broke off its stream."""


@dataclass(frozen=True)
class PeerSpec:
    name: str
    url: str  # base URL ending in /v1


def parse_peer(text: str) -> PeerSpec:
    """`NAME=URL` (as `--peer` takes it); the URL may leave out its /v1."""
    name, sep, url = text.partition("=")
    name, url = name.strip(), url.strip().rstrip("/")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"--peer wants NAME=http://HOST:PORT, got {text!r}")
    return PeerSpec(name, url if url.endswith("/v1") else f"{url}/v1")


class Peer:
    """Runs requests through one OpenAI-compatible server; `answer` has the signature of workloads.Ours."""

    def __init__(self, spec: PeerSpec, tokenizer: PreTrainedTokenizerBase, http: aiohttp.ClientSession) -> None:
        self.name = spec.name
        self.url = spec.url
        self._tokenizer = tokenizer
        self._http = http
        self.model = ""
        self.token_prompts = True
        self.refused: set[str] = set()

    async def start(self) -> None:
        """Learn the model's name from /v1/models (a server that lists none gets "default")."""
        async with self._http.get(f"{self.url}/models") as response:
            response.raise_for_status()
            listing: Any = await response.json(content_type=None)
        entries = listing.get("data") if isinstance(listing, dict) else None
        ids = [e.get("id") for e in entries or () if isinstance(e, dict) and e.get("id")]
        self.model = str(ids[0]) if ids else "default"

    async def answer(
        self, prompt_ids: Sequence[int], max_new_tokens: int, session_id: str | None = None, min_new_tokens: int = 0
    ) -> Answer:
        """Greedy, streamed; `session_id` is ours alone (a server finds a conversation's cache by its prompt)."""
        del session_id
        for _ in range(len(OPTIONAL) + 2):  # each try drops at least one refused field, or the token prompt
            body = self._body(prompt_ids, max_new_tokens, min_new_tokens)
            start = time.perf_counter()
            async with self._http.post(f"{self.url}/completions", json=body) as response:
                if response.status < 400:
                    return await self._read(response, start)
                error = await response.text()
            if not self._cure(response.status, error):
                raise PeerError(f"{self.name} refused a request: HTTP {response.status}: {error[:300]}")
        raise PeerError(f"{self.name} kept refusing requests: {error[:300]}")

    def _body(self, prompt_ids: Sequence[int], max_new_tokens: int, min_new_tokens: int) -> dict[str, Any]:
        prompt: Any = list(prompt_ids)
        if not self.token_prompts:
            prompt = self._tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if min_new_tokens:
            body["min_tokens"] = min_new_tokens
            if min_new_tokens >= max_new_tokens:
                body["ignore_eos"] = True  # the same length for certain; llama.cpp has no min_tokens
        for name in self.refused:
            body.pop(name, None)
        return body

    def _cure(self, status: int, error: str) -> bool:
        """Change what the next try sends after a refusal; False when nothing is left to change."""
        if status not in (400, 422):
            return False
        named = {name for name in OPTIONAL if name in error} - self.refused
        if named:
            log.info("%s does not take %s; leaving them out", self.name, ", ".join(sorted(named)))
            self.refused |= named
            return True
        if self.token_prompts and "prompt" in error:
            log.info("%s does not take token-ID prompts; sending their text", self.name)
            self.token_prompts = False
            return True
        return False

    async def _read(self, response: aiohttp.ClientResponse, start: float) -> Answer:
        first = 0.0
        parts: list[str] = []
        usage: int | None = None
        finished = False
        async for data in sse_data(response.content):
            if data == "[DONE]":
                finished = True
                break
            chunk: Any = json.loads(data)
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or ():
                text = choice.get("text")
                if text:
                    if not parts:
                        first = time.perf_counter() - start
                    parts.append(text)
                finished = finished or bool(choice.get("finish_reason"))
        seconds = time.perf_counter() - start
        if not finished:
            raise PeerError(f"{self.name} ended its stream before the answer was finished")
        text = "".join(parts)
        tokens = usage if isinstance(usage, int) else len(self._tokenizer.encode(text, add_special_tokens=False))
        return Answer(text, tokens, seconds, first)
