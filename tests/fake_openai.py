"""A scripted OpenAI-compatible server (aiohttp) for the failure cases a real server won't produce on demand."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Reply:
    """A streamed answer in these pieces, after `reasoning` pieces sent in the delta's `reasoning_field` (as vLLM's
    reasoning parsers and DeepSeek's API send them; chat only). `finish` is the last chunk's finish_reason, then
    `[DONE]`; with None the response just ends after the pieces, neither said."""

    pieces: tuple[str, ...] = ("Hello", " there", "!")
    delay: float = 0.0
    reasoning: tuple[str, ...] = ()
    reasoning_field: str = "reasoning_content"
    finish: str | None = "stop"


@dataclass(frozen=True)
class Status:
    """An HTTP error instead of a stream."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": "scripted failure"}'


@dataclass(frozen=True)
class DieAfter:
    """Stream `pieces`, then drop the connection as a crashed server would."""

    pieces: tuple[str, ...] = ("Half", " an")


@dataclass(frozen=True)
class HangUp:
    """Drop the connection before answering, as a server closing an idle keep-alive connection just as a request
    arrives on it."""


@dataclass(frozen=True)
class Endless:
    """Stream a piece every `delay` seconds until the client goes away."""

    delay: float = 0.02


Action = Reply | Status | DieAfter | HangUp | Endless


class FakeOpenAIServer:
    def __init__(self, *, models: list[dict[str, Any]] | None = None, refuses: frozenset[str] = frozenset()) -> None:
        self.script: deque[Action] = deque()
        # Body fields answered with a 422 naming them, as `transformers serve` answers fields it does not know.
        self.refuses = refuses
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.models = models if models is not None else []
        self.streaming = asyncio.Event()
        self.client_left = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/v1/models", self._list_models)
        self._runner = web.AppRunner(app, handler_cancellation=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.models})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.paths.append(request.path)
        self.auth.append(request.headers.get("Authorization"))
        unexpected = self.refuses & body.keys()
        if unexpected:
            return web.json_response({"detail": f"Unexpected fields in the request: {unexpected}"}, status=422)
        action = self.script.popleft() if self.script else Reply()
        if isinstance(action, HangUp):
            assert request.transport is not None
            request.transport.abort()
            return web.Response()  # never sent: the connection is gone
        if isinstance(action, Status):
            return web.Response(status=action.code, text=action.body, headers=action.headers)
        chat = request.path.endswith("/chat/completions")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if isinstance(action, Reply):
                for piece in action.reasoning:
                    await response.write(_event("", chat, reasoning={action.reasoning_field: piece}))
                    await asyncio.sleep(action.delay)
                for piece in action.pieces:
                    await response.write(_event(piece, chat))
                    await asyncio.sleep(action.delay)
                if action.finish is not None:
                    await response.write(_event("", chat, finish=action.finish))
                    await response.write(b"data: [DONE]\n\n")
                return response
            if isinstance(action, DieAfter):
                for piece in action.pieces:
                    await response.write(_event(piece, chat))
                await asyncio.sleep(0.05)  # let the client read the pieces before the line goes dead
                assert request.transport is not None
                request.transport.abort()
                return response
            self.streaming.set()
            while True:
                await response.write(_event("x", chat))
                await asyncio.sleep(action.delay)
        except ConnectionError:
            self.client_left.set()
            return response


def _event(text: str, chat: bool, finish: str | None = None, reasoning: dict[str, str] | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = reasoning or {"content": text}
    else:
        choice["text"] = text
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
