"""The Discord client: an AutoShardedBot that is handed its settings and core parts, and loads the cogs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import discord
from discord.ext import commands

from bot.config import Settings
from bot.core import Core, build_engine, open_core
from bot.discord_api import use_api_base
from bot.discord_text import no_pings
from bot.metrics import BotMetrics, prometheus_endpoint

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.chat", "cogs.sessions", "cogs.status")


def chat_intents() -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


@runtime_checkable
class Drainable(Protocol):
    async def drain(self, grace: float) -> None:
        """Stop taking new work; finish what runs within `grace` seconds, then cancel the rest."""


class ChatBot(commands.AutoShardedBot):
    def __init__(
        self,
        *,
        settings: Settings,
        core: Core,
        metrics: BotMetrics,
        extensions: Sequence[str] = EXTENSIONS,
        **options: Any,
    ) -> None:
        d = settings.discord
        if d.shard_count is not None:  # else discord.py asks Discord for its recommended count
            options.setdefault("shard_count", d.shard_count)
            if d.shard_ids:
                options.setdefault("shard_ids", list(d.shard_ids))
        super().__init__(
            # Slash commands and mentions only: no prefix commands, so no text is ever parsed as one.
            command_prefix=commands.when_mentioned,
            intents=chat_intents(),
            allowed_mentions=no_pings(ping_author=settings.discord.ping_author),
            help_command=None,
            **options,
        )
        self.settings = settings
        self.core = core
        self.metrics = metrics
        self.initial_extensions = tuple(extensions)

    async def setup_hook(self) -> None:
        # A cog that fails to load raises here and stops start-up: every cog is required.
        for extension in self.initial_extensions:
            await self.load_extension(extension)
        guild_ids = self.settings.discord.guild_ids
        if guild_ids:
            for guild_id in guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d app commands to guild %s", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d app commands globally (may take a while to show)", len(synced))

    async def close(self) -> None:
        # Let cogs finish (or stop and explain) the answers they are writing while Discord is still reachable.
        grace = self.settings.discord.shutdown_grace
        drains = [cog.drain(grace) for cog in self.cogs.values() if isinstance(cog, Drainable)]
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
        await super().close()

    async def on_message(self, message: discord.Message) -> None:
        # The chat cog owns messages; the default would try to run prefix commands on every mention.
        return

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("logged in as %s (%s) in %d guilds", self.user, self.user.id, len(self.guilds))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_requested_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` instead of raising KeyboardInterrupt or killing the process at once."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s: already stopping", signum.name)
            return
        log.info("%s: stopping; no new turns, running answers get the shutdown grace period", signum.name)
        stop.set()

    try:
        for signum in STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):
                # Windows, or not the main thread: the default handlers stay (Ctrl-C still stops the bot).
                continue
            installed.append(signum)
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def serve_until_stopped(bot: ChatBot, token: str, stop: asyncio.Event) -> None:
    """Run the bot until it ends by itself or `stop` is set; then close it gracefully (see ChatBot.close)."""
    runner = asyncio.create_task(bot.start(token), name="discord-bot")
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not runner.done():
        await bot.close()
    await runner


async def run_discord_bot(settings: Settings, *, token: str) -> None:
    stop = asyncio.Event()
    # Installed before the model loads, so a stop during a long load is graceful too.
    with stop_requested_by_signals(stop):
        async with (
            use_api_base(settings.discord.api_base),  # first: no Discord API there fails before the model loads
            open_core(settings, engine=build_engine(settings)) as core,  # both engines count their own tokens
        ):
            metrics = BotMetrics(settings=settings, engine=core.engine, store=core.store)
            async with (
                ChatBot(settings=settings, core=core, metrics=metrics) as bot,
                prometheus_endpoint(settings, metrics),
            ):
                if stop.is_set():
                    log.info("stopped before connecting to Discord")
                    return
                await serve_until_stopped(bot, token, stop)
        log.info("stopped: history flushed, gateway closed")
