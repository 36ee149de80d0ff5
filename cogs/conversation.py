"""`/reset` and `/help`: starting a place's conversation afresh, and what the bot does here."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import AccessPolicy
from bot.discord_text import no_pings
from cogs.chat import asker_of, place_of
from cogs.message_parts import place_names

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

NOT_HERE = "I don't chat in this kind of channel."
MAY_NOT_SEND = "You can't send messages here, so you can't reset this conversation either."


def help_text(where: str, bot_name: str) -> str:
    return "\n".join(
        [
            f"**{bot_name}** is a chat bot backed by a language model. {where}",
            "Each channel, thread and DM has a conversation the model remembers; it sees who said what.",
            "- **Reply** to one of my answers to go on in that conversation, no mention needed.",
            "- Reply to someone else's message and mention me: I read the message you reply to.",
            "- Attach **text files** (.txt, .md, source code): I read them with your message.",
            "",
            "**Commands**",
            "`/newchat [topic]`: a new conversation (in a text channel: in a new thread)",
            "`/reset`: start this place's conversation afresh (the old one stays in `/history`)",
            "`/history [session]`: your conversations here, or one conversation's transcript",
            "`/persona set|show|clear`: the system prompt of this channel or server (server managers)",
            "`/status`: the model and the queue (server managers)",
            "`/help`: this message",
        ]
    )


class ConversationCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.chat = bot.core.chat
        self.access = AccessPolicy(bot.settings.discord)

    @app_commands.command(name="reset")
    async def reset(self, interaction: discord.Interaction) -> None:
        """Start this channel's, thread's or DM's conversation afresh; the old one stays in /history."""
        refusal = self.access.check(asker_of(interaction.channel, interaction.user))
        if refusal is not None:
            await interaction.response.send_message(refusal.sentence, ephemeral=True)
            return
        channel = interaction.channel
        place = place_of(channel, interaction.user) if channel is not None else None  # type: ignore[arg-type]
        if place is None:
            await interaction.response.send_message(NOT_HERE, ephemeral=True)
            return
        permissions = interaction.permissions
        in_thread = isinstance(channel, discord.Thread)
        if interaction.guild is not None and not (
            permissions.send_messages_in_threads if in_thread else permissions.send_messages
        ):
            await interaction.response.send_message(MAY_NOT_SEND, ephemeral=True)
            return
        old = await self.chat.store.current(place)
        names = place_names(channel, self.bot.user)
        session = await self.chat.new_session(place, owner_id=interaction.user.id, names=names)
        log.info("/reset in %s by %s: %s -> %s", place.key, interaction.user.id, old and old.id, session.id)
        text = f"{interaction.user.mention} started this conversation afresh (`{session.id}`)."
        if old is not None and old.turns:
            text += f" The previous one is `{old.id}` in `/history`."
        await interaction.response.send_message(text, allowed_mentions=no_pings())

    @app_commands.command(name="help")
    async def help(self, interaction: discord.Interaction) -> None:
        """What this bot does here, and its commands."""
        me = self.bot.user
        channel = interaction.channel
        if isinstance(channel, discord.DMChannel):
            where = "Here in our DM, every message you send is a turn."
        elif isinstance(channel, discord.Thread) and me is not None and channel.owner_id == me.id:
            where = "In this thread every message is a turn: no need to mention me."
        else:
            where = f"Mention me ({me.mention if me else '@bot'}) in a message to talk to me here."
        name = me.display_name if me is not None else "This bot"
        await interaction.response.send_message(help_text(where, name), ephemeral=True, allowed_mentions=no_pings())


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(ConversationCog(bot))
