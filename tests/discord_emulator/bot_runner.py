"""Running a real discord.py client against the emulator, and closing it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import discord
import discord.http

from .server import DiscordEmulator


@contextlib.asynccontextmanager
async def running_emulator(**kwargs: object) -> AsyncIterator[DiscordEmulator]:
    """`async with running_emulator() as emu:`; keyword arguments go to DiscordEmulator."""
    async with DiscordEmulator(**kwargs) as emu:  # type: ignore[arg-type]
        yield emu


@contextlib.asynccontextmanager
async def run_bot(
    client: discord.Client,
    emu: DiscordEmulator,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> AsyncIterator[None]:
    """Logs `client` in against `emu`, connects it, waits for on_ready; closes it on exit.

    Without a shard_count discord.py asks GET /gateway/bot for the gateway URL, which is how it finds the
    emulator's websocket. With one it dials Discord's own gateway instead, unless the client points
    discord.py at the URL from GET /gateway/bot itself (our ChatBot does when its api_base is not Discord's).
    """
    previous_base = discord.http.Route.BASE
    discord.http.Route.BASE = emu.api_base
    connect: asyncio.Task[None] | None = None
    try:
        await client.login(emu.token)
        connect = asyncio.create_task(client.connect(), name="discord-client-connect")
        ready = asyncio.create_task(client.wait_until_ready(), name="discord-client-ready")
        done, _ = await asyncio.wait({connect, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
            if connect in done:
                connect.result()
            raise TimeoutError(f"the client did not become ready within {timeout}s")
        yield
    finally:
        await client.close()
        if connect is not None:
            await connect
        discord.http.Route.BASE = previous_base
