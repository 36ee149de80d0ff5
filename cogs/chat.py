"""Conversation turns from Discord messages: a mention in a channel, any message in a session's thread or a DM."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.chat import TurnInput
from bot.discord_text import strip_mentions_of
from bot.errors import BotError
from bot.reply_stream import StreamingReply
from bot.sessions import Place

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

TURN_MESSAGE_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def place_of(channel: discord.abc.Messageable, author: discord.abc.User) -> Place | None:
    """Where a message's turn lives, or None for channels the bot does not chat in (voice, forums...)."""
    if isinstance(channel, discord.DMChannel):
        return Place(kind="dm", user_id=author.id)
    if isinstance(channel, discord.Thread):
        return Place(kind="thread", guild_id=channel.guild.id, channel_id=channel.parent_id, thread_id=channel.id)
    if isinstance(channel, discord.TextChannel):
        return Place(kind="channel", guild_id=channel.guild.id, channel_id=channel.id)
    return None


class ChatCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.chat = bot.core.chat
        self.store = bot.core.store
        # The task answering each user message, so deleting the message cancels its answer.
        self.turn_tasks: dict[int, asyncio.Task[None]] = {}

    def is_bound_thread(self, place: Place) -> bool:
        return bool(self.store.list_sessions(place_keys=[place.key]))

    def turn_text(self, message: discord.Message) -> tuple[Place, str] | None:
        """The place and text of the turn this message is, or None when it is not addressed to the bot."""
        me = self.bot.user
        if me is None or message.author.bot or message.type not in TURN_MESSAGE_TYPES:
            return None
        place = place_of(message.channel, message.author)
        if place is None:
            return None
        mentioned = any(user.id == me.id for user in message.mentions)
        if place.kind == "dm":
            addressed = self.bot.settings.discord.allow_dms
        elif place.kind == "thread":
            addressed = mentioned or self.is_bound_thread(place)
        else:
            addressed = mentioned
        if not addressed:
            return None
        return place, strip_mentions_of(message.content, me.id)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        turn = self.turn_text(message)
        if turn is None:
            return
        place, text = turn
        task = asyncio.current_task()
        if task is not None:
            self.turn_tasks[message.id] = task
        try:
            await self.answer(message, place, text)
        finally:
            self.turn_tasks.pop(message.id, None)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        task = self.turn_tasks.get(payload.message_id)
        if task is not None:
            log.info("message %s deleted: cancelling its answer", payload.message_id)
            task.cancel()

    async def answer(self, message: discord.Message, place: Place, text: str) -> None:
        settings = self.bot.settings.discord
        reply = StreamingReply(message, edit_interval=settings.stream_edit_interval, ping_author=settings.ping_author)
        request = TurnInput(place=place, author_id=message.author.id, text=text, message_id=message.id)
        try:
            async with message.channel.typing(), self.chat.turn(request) as turn:
                if turn.queued_ahead:
                    await reply.note(f"*queued: {turn.queued_ahead} ahead*")
                async for delta in turn.stream():
                    await reply.feed(delta)
                await reply.finish()
        except BotError as exc:
            log.info("turn in %s refused or failed: %s", place.key, exc)
            await self.tell(reply, exc.user_message)
        except discord.HTTPException as exc:
            # Discord refused a send or an edit: the turn is marked failed in history by the chat service.
            log.warning("Discord error while answering in %s: %s", place.key, exc)
            await self.tell(reply, "I could not deliver the whole answer because Discord refused a message.")

    async def tell(self, reply: StreamingReply, sentence: str) -> None:
        try:
            await reply.fail(sentence)
        except discord.HTTPException as exc:
            log.warning("could not tell the user about an error: %s", exc)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(ChatCog(bot))
