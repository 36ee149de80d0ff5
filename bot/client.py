"""The Discord client: an AutoShardedBot that is handed its settings and core parts, and loads the cogs; and the
start-up around it: Discord reached and the token checked first (retried while Discord is unreachable), then the
model loaded, then the gateway connected, so no Discord event arrives before the model is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import aiohttp
import discord
from discord.ext import commands

from bot.config import DiscordSettings, Settings
from bot.core import Core, build_engine, open_core
from bot.discord_api import ApiBaseDownError, ApiBaseUnreachableError, use_api_base
from bot.discord_text import no_pings
from bot.errors import ConfigError, StartUpError, first_line
from bot.metrics import BotMetrics, prometheus_endpoint

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.chat", "cogs.sessions", "cogs.conversation", "cogs.status", "cogs.recovery", "cogs.personas")


# What the bot does in a server, so what its invite link asks for; each one is for calls the code makes.
BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,  # see the channels and threads it answers in
    send_messages=True,  # answers, and the typing indicator
    send_messages_in_threads=True,  # answers in /newchat threads and in threads it is mentioned in
    create_public_threads=True,  # /newchat in a text channel opens a public thread
    read_message_history=True,  # answers are replies to the user's message; recovery edits earlier answers
    attach_files=True,  # /history sends a long transcript as a file
)
INVITE_SCOPES = ("bot", "applications.commands")  # the bot user, and its slash commands

MESSAGE_CONTENT_OFF = (
    "Discord refused the Message Content intent (gateway close 4014): in the Discord Developer Portal, open the "
    "application, then Bot → Privileged Gateway Intents → turn on Message Content Intent, save, and start again"
)
# "Discord is not there right now", as opposed to "Discord said no": worth trying again.
DISCORD_DOWN: tuple[type[BaseException], ...] = (
    ApiBaseDownError,
    aiohttp.ClientConnectionError,  # refused, no such host (DNS), reset
    TimeoutError,
    discord.DiscordServerError,  # 5xx, after discord.py's own retries
    discord.GatewayNotFound,
)


def invite_url(application_id: int) -> str:
    """The OAuth2 link that adds the bot to a server with exactly the permissions it needs."""
    return discord.utils.oauth_url(application_id, permissions=BOT_PERMISSIONS, scopes=INVITE_SCOPES)


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
        if self.application_id is not None:
            log.info("invite link, with the permissions the bot needs: %s", invite_url(self.application_id))


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
    with stop_requested_by_signals(stop), discord_errors_explained(settings):
        async with contextlib.AsyncExitStack() as api:
            # First: a wrong api_base or token fails in seconds, not after the minutes a 7B model takes to load.
            if not await reach_discord(api, settings.discord, token, stop):
                log.info("stopped before connecting to Discord")
                return
            core = await api.enter_async_context(open_core(settings, engine=build_engine(settings)))
            metrics = BotMetrics(settings=settings, engine=core.engine, store=core.store, personas=core.personas)
            async with (
                ChatBot(settings=settings, core=core, metrics=metrics) as bot,
                prometheus_endpoint(settings, metrics),
            ):
                if stop.is_set():
                    log.info("stopped before connecting to Discord")
                    return
                try:
                    await serve_until_stopped(bot, token, stop)
                except DISCORD_DOWN as exc:
                    # Discord went away while the model loaded (later on, discord.py reconnects by itself).
                    raise StartUpError(f"lost Discord at {settings.discord.api_base}: {first_line(exc)}") from None
        log.info("stopped: history flushed, gateway closed")


async def reach_discord(stack: contextlib.AsyncExitStack, d: DiscordSettings, token: str, stop: asyncio.Event) -> bool:
    """Point discord.py at `[discord] api_base` (kept until `stack` closes), then check the token; each step tried
    `login_attempts` times while Discord cannot be reached. False when `stop` was set meanwhile."""

    async def find_api() -> None:
        await stack.enter_async_context(use_api_base(d.api_base))

    return await _retrying(find_api, d, stop) and await check_token(d, token, stop)


async def check_token(d: DiscordSettings, token: str, stop: asyncio.Event) -> bool:
    """Log in once over REST (discord.LoginFailure for a wrong token), retried while Discord cannot be reached;
    False when `stop` was set meanwhile."""

    async def log_in() -> None:
        # A client of its own: the bot's setup_hook needs the loaded model, and this must come before it.
        # It never connects; the bot's intents only because discord.py warns about a client without the guilds one.
        async with discord.Client(intents=chat_intents()) as probe:
            await probe.login(token)

    return await _retrying(log_in, d, stop)


async def _retrying(step: Callable[[], Awaitable[None]], d: DiscordSettings, stop: asyncio.Event) -> bool:
    delay = d.login_retry_delay
    for attempt in range(1, d.login_attempts + 1):
        try:
            await step()
            return True
        except DISCORD_DOWN as exc:
            reason = first_line(exc)
            if attempt == d.login_attempts:
                tries = "once" if attempt == 1 else f"{attempt} times"
                raise StartUpError(
                    f"cannot reach Discord, tried {tries}: {reason}; check the network "
                    "(exit status 1: a service manager may start the bot again)"
                ) from None
            log.warning("cannot reach Discord (%s); try %d of %d in %gs", reason, attempt + 1, d.login_attempts, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
            return False
        delay *= 2
    return False


@contextlib.contextmanager
def discord_errors_explained(settings: Settings) -> Iterator[None]:
    """Discord's refusals as one line each (ConfigError: exit status 2; StartUpError: the status it carries)."""
    source = settings.source or "<config>"
    try:
        yield
    except discord.LoginFailure:
        raise ConfigError(
            source,
            "discord.token_env",
            f"Discord rejected the token in {settings.discord.token_env} (copy it again from the Developer Portal: "
            "Bot → Reset Token)",
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise StartUpError(MESSAGE_CONTENT_OFF, exit_status=2) from None
    except ApiBaseUnreachableError as exc:  # it answered, and not as Discord's API (an outage is retried above)
        raise ConfigError(source, "discord.api_base", str(exc)) from None
    except discord.HTTPException as exc:
        raise StartUpError(f"Discord refused to start the bot: HTTP {exc.status} {exc.text}") from None
