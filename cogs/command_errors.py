"""How a slash command that failed or was refused answers: one ephemeral sentence, the same for every cog."""

from __future__ import annotations

import logging

import discord
from discord import app_commands

from bot.errors import BotError

log = logging.getLogger(__name__)

FALLBACK = "That didn't work; please try again."


class AccessRefused(app_commands.CheckFailure):
    """A command refused by the access rules; `sentence` is what the caller is told (ephemerally)."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


async def tell_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """The caller alone is told why; only errors that are not ours to expect are logged with a traceback."""
    original = getattr(error, "original", error)
    if isinstance(original, AccessRefused):
        sentence = original.sentence
    elif isinstance(original, BotError):
        sentence = original.user_message
    else:
        sentence = FALLBACK
    if not isinstance(original, BotError | discord.HTTPException | AccessRefused):
        log.warning("app command %s failed", interaction.command and interaction.command.name, exc_info=original)
    send = interaction.followup.send if interaction.response.is_done() else interaction.response.send_message
    try:
        await send(sentence, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not report an app command error: %s", exc)
