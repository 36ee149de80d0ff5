"""Running a real discord.py client against the emulator, and closing it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import discord

from bot.discord_api import use_api_base

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

    discord.py's REST calls and gateway go to the emulator for the duration (bot.discord_api.use_api_base)."""
    connect: asyncio.Task[None] | None = None
    async with use_api_base(emu.api_base):
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
