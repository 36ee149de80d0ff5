"""`python -m bot demo` as a user starts it (a child process), and the page's own API and websocket to talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from discord_harness import REPO, BotProcess

from bot.reply_stream import STREAMING_MARK

Event = dict[str, Any]
URL = re.compile(r"http://127\.0\.0\.1:\d+/")
START_TIMEOUT_S = 180.0  # a cold start imports torch and transformers on a busy 2-core machine


@dataclass
class RunningDemo:
    process: BotProcess
    url: str
    ready_line: str

    async def state(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "_demo/state") as response:
            response.raise_for_status()
            return dict(await response.json())

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.post(self.url + "_demo/" + path, json=body) as response:
            data = await response.json()
            assert response.status == 200, data
            return dict(data)


@contextlib.asynccontextmanager
async def running_demo(model_dir: Path, data_dir: Path) -> AsyncIterator[RunningDemo]:
    """The demo on a free port, ready (the bot connected); stopped with SIGINT afterwards, which must end it
    cleanly (exit 0, no ERROR or traceback in its output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "demo",
        "--model",
        str(model_dir),
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with BotProcess(process) as demo:
        ready = await demo.wait_for_line("Ready after", timeout=START_TIMEOUT_S)
        found = URL.search(ready)
        assert found is not None, demo.log
        yield RunningDemo(demo, found.group(0), ready)
        demo.send_signal(signal.SIGINT)
        code = await demo.wait()
        assert code == 0, demo.log
        assert not demo.errors(), demo.log


async def next_event(ws: aiohttp.ClientWebSocketResponse, check: Callable[[Event], bool], timeout: float = 60) -> Event:  # noqa: ASYNC109
    """The first event from /_demo/events that `check` accepts."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await ws.receive()
            assert frame.type is aiohttp.WSMsgType.TEXT, frame
            event: Event = json.loads(frame.data)
            if check(event):
                return event


def final_reply_to(asked: dict[str, Any]) -> Callable[[Event], bool]:
    """Accepts the bot's reply to `asked` once its final edit has dropped the streaming mark."""

    def check(event: Event) -> bool:
        if event["type"] != "message":
            return False
        message = event["message"]
        reference = message.get("message_reference") or {}
        return (
            message["author"]["bot"]
            and reference.get("message_id") == asked["id"]
            and not message["content"].endswith(STREAMING_MARK)
        )

    return check


def world_of(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The demo's guild, its people by username and its channels by name, from /_demo/state."""
    guild = state["guilds"][0]
    people = {m["username"]: m for m in guild["members"]}
    channels = {c["name"]: c for c in guild["channels"]}
    return guild, people, channels
