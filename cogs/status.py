"""`/status`: the operator's view of the bot (admins only, ephemeral). The figures come from bot/metrics.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_text import no_pings
from bot.metrics import StatusFigures

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

ADMINS_ONLY = "Only server administrators (or members with Manage Server) can see the bot's status."


def may_see_status(interaction: discord.Interaction) -> bool:
    """Checked at run time too: a server can give the command to anyone in its integration settings."""
    if interaction.guild is None:
        return False
    permissions = interaction.permissions
    return permissions.administrator or permissions.manage_guild


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def render_status(f: StatusFigures) -> str:
    if f.gpus:
        gpu = "; ".join(
            f"{g.device}: {_gib(g.allocated_bytes)} used, {_gib(g.reserved_bytes)} reserved of {_gib(g.total_bytes)}"
            for g in f.gpus
        )
    else:
        gpu = "CPU (no CUDA GPU)"
    uptime = timedelta(seconds=int(f.uptime_s))
    return "\n".join(
        [
            "**Bot status**",
            f"Backend: {f.backend} · Model: `{f.model}`",
            f"Device: {f.device} · dtype: {f.dtype}",
            f"GPU memory: {gpu}",
            f"Queue: {f.waiting} waiting · {f.running} running",
            f"Speed: {f.tokens_per_second:.1f} tokens/s over the last minute ({f.tokens_generated} tokens, "
            f"{f.requests} requests since start)",
            f"Sessions stored: {f.sessions_stored} · Personas: {f.personas}",
            f"Uptime: {uptime} · Version: {f.version}",
        ]
    )


class StatusCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.metrics = bot.metrics
        self._sampler: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        self._sampler = asyncio.create_task(self.metrics.run(), name="metrics-sampler")

    async def cog_unload(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    @app_commands.command(name="status")
    @app_commands.default_permissions(administrator=True)
    @app_commands.guild_only()
    async def status(self, interaction: discord.Interaction) -> None:
        """The bot's model, load, speed and storage (admins only)."""
        if not may_see_status(interaction):
            await interaction.response.send_message(ADMINS_ONLY, ephemeral=True)
            return
        text = render_status(self.metrics.figures())
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings())


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(StatusCog(bot))
