"""The Discord client: an AutoShardedBot that is handed its settings and core parts, and loads the cogs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import discord
from discord.ext import commands

from bot.config import Settings
from bot.core import Core, open_core
from bot.discord_text import no_pings

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.chat", "cogs.sessions")


def chat_intents() -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


class ChatBot(commands.AutoShardedBot):
    def __init__(
        self,
        *,
        settings: Settings,
        core: Core,
        extensions: Sequence[str] = EXTENSIONS,
        **options: Any,
    ) -> None:
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

    async def on_message(self, message: discord.Message) -> None:
        # The chat cog owns messages; the default would try to run prefix commands on every mention.
        return

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("logged in as %s (%s) in %d guilds", self.user, self.user.id, len(self.guilds))


def use_api_base(api_base: str) -> None:
    """Send REST calls to `api_base` (a REST proxy, or the emulator in tests): discord.py's own setting for it."""
    discord.http.Route.BASE = api_base.rstrip("/")


async def run_discord_bot(settings: Settings, *, token: str) -> None:
    use_api_base(settings.discord.api_base)
    async with open_core(settings) as core, ChatBot(settings=settings, core=core) as bot:
        await bot.start(token)
