"""`/persona set|show|clear`: the system prompt new chats start with in a channel or the whole server. Only
server managers (Manage Server, or a `[discord] newchat_system_prompt_role_ids` role) may use it; every answer is
ephemeral. The personas themselves live in bot/personas.py."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import AccessPolicy
from bot.discord_text import MESSAGE_LIMIT, no_pings
from bot.personas import MAX_PROMPT_CHARS, Persona
from cogs.chat import asker_of
from cogs.command_errors import AccessRefused, tell_command_error

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

PER_SERVER = "Personas are per server: use `/persona` in a server channel."
NEEDS_MANAGER = "Only members with Manage Server (or a role the bot's operator named) can use `/persona`."
BLANK_PROMPT = "A persona needs some visible text."
ScopeChoice = Literal["channel", "server"]


def where(persona: Persona) -> str:
    return "the whole server" if persona.channel_id is None else f"<#{persona.channel_id}>"


class PersonasCog(commands.Cog):
    persona = app_commands.Group(
        name="persona",
        description="The system prompt new chats start with in this channel or the whole server (managers only)",
        guild_only=True,
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.personas = bot.core.personas
        self.access = AccessPolicy(bot.settings.discord)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild is None:
            raise AccessRefused(PER_SERVER)
        asker = asker_of(interaction.channel, interaction.user)
        refusal = self.access.check(asker)
        if refusal is not None:
            raise AccessRefused(refusal.sentence)
        # Checked here and not by default_permissions: those would hide the command from the configured roles.
        allowed = interaction.permissions
        if not self.access.may_set_persona(asker, manages_server=allowed.administrator or allowed.manage_guild):
            raise AccessRefused(NEEDS_MANAGER)
        return True

    def _here(self, interaction: discord.Interaction) -> tuple[int, int | None]:
        # A thread shares its parent channel's persona, as it shares the channel's access rules.
        asker = asker_of(interaction.channel, interaction.user)
        assert asker.guild_id is not None  # interaction_check refused DMs
        return asker.guild_id, asker.channel_id

    @persona.command(name="set")
    @app_commands.describe(
        prompt="The system prompt; may use {date}, {time}, {server}, {channel} and {bot}",
        scope="This channel (the default) or the whole server",
    )
    async def set_persona(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        scope: ScopeChoice = "channel",
    ) -> None:
        """Set the system prompt new chats here start with."""
        if not prompt.strip():
            await interaction.response.send_message(BLANK_PROMPT, ephemeral=True)
            return
        guild_id, channel_id = self._here(interaction)
        persona = await self.personas.set(
            guild_id, channel_id if scope == "channel" else None, prompt, set_by=interaction.user.id
        )
        text = f"Persona set for {where(persona)}. New chats there start with it; chats already going keep theirs."
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings())

    @persona.command(name="show")
    async def show_persona(self, interaction: discord.Interaction) -> None:
        """Show the persona that applies here, and where it comes from."""
        guild_id, channel_id = self._here(interaction)
        persona = self.personas.get(guild_id, channel_id)
        if persona is None:
            await interaction.response.send_message(
                "No persona here: new chats start with the bot's default system prompt.", ephemeral=True
            )
            return
        source = "this channel's own" if persona.channel_id is not None else "the server's"
        set_at = discord.utils.format_dt(discord.utils.parse_time(persona.set_at), "R")
        header = f"The persona here is {source} ({where(persona)}), set by <@{persona.set_by}> {set_at}:"
        quoted = "\n".join(f"> {line}" for line in persona.prompt.splitlines())
        text = f"{header}\n{quoted}"
        if len(text) <= MESSAGE_LIMIT:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings())
            return
        file = discord.File(io.BytesIO(persona.prompt.encode()), filename="persona.txt")
        await interaction.response.send_message(
            f"{header} (attached)", file=file, ephemeral=True, allowed_mentions=no_pings()
        )

    @persona.command(name="clear")
    @app_commands.describe(scope="This channel's persona (the default) or the whole server's")
    async def clear_persona(self, interaction: discord.Interaction, scope: ScopeChoice = "channel") -> None:
        """Remove the persona of this channel or of the whole server."""
        guild_id, channel_id = self._here(interaction)
        removed = await self.personas.clear(guild_id, channel_id if scope == "channel" else None)
        if removed is None:
            text = "There was no persona set for " + ("this channel." if scope == "channel" else "the whole server.")
        else:
            text = f"Persona of {where(removed)} cleared. New chats there start without it."
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings())

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await tell_command_error(interaction, error)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(PersonasCog(bot))
