"""After a crash: answers that were being written when the bot died are closed in Discord, once.

History marks a turn pending while its answer streams (bot/chat.py). At start-up every pending turn's Discord
message is edited to say the answer was cut off (its streaming mark dropped), then the turn is marked interrupted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.discord_text import MESSAGE_LIMIT, no_pings
from bot.reply_stream import STREAMING_MARK
from bot.sessions import Place, Session, StoredMessage

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

INTERRUPTED = "The bot restarted before this answer was finished; please ask again."


class RecoveryCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.done: asyncio.Task[int] | None = None

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        # on_ready comes again after a reconnect; the turns are closed once per start.
        if self.done is None:
            self.done = asyncio.create_task(self.close_interrupted(), name="close-interrupted-turns")

    async def close_interrupted(self) -> int:
        closed = await self.bot.core.chat.close_interrupted_turns(self.tell)
        if closed:
            log.info("closed %d answers a crash had cut off", closed)
        return closed

    async def tell(self, session: Session, message: StoredMessage) -> None:
        """Edit the cut-off answer to say so; a message that is gone or cannot be edited is left (and logged)."""
        if message.answer_message_id is None:
            return
        try:
            channel = await self.channel_of(session.place)
            answer = await channel.fetch_message(message.answer_message_id)
            text = answer.content.removesuffix(STREAMING_MARK).rstrip()
            note = f"*{INTERRUPTED}*"
            content = f"{text}\n\n{note}" if text else note
            await answer.edit(content=content[-MESSAGE_LIMIT:], allowed_mentions=no_pings())
        except (discord.HTTPException, LookupError) as exc:
            log.warning("session %s: could not mark the cut-off answer in Discord: %s", session.id, exc)

    async def channel_of(self, place: Place) -> discord.abc.Messageable:
        if place.kind == "dm":
            assert place.user_id is not None
            user = await self.bot.fetch_user(place.user_id)
            return user.dm_channel or await user.create_dm()
        channel_id = place.thread_id if place.kind == "thread" else place.channel_id
        if channel_id is None:
            raise LookupError(f"{place.key} has no Discord channel")
        channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            raise LookupError(f"channel {channel_id} takes no messages")
        return channel


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(RecoveryCog(bot))
