"""Conversation turns from Discord messages: a mention in a channel, a reply to one of its answers, any message in a
/newchat thread or a DM; every answer streamed, with its buttons (what they do: cogs/answer_actions.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.admission import (
    AccessPolicy,
    Admission,
    AdmissionTicket,
    Asker,
    NoticeGate,
    Refusal,
    has_visible_text,
)
from bot.attachments import TextFile
from bot.chat import TurnInput
from bot.discord_text import no_pings, strip_mentions_of
from bot.errors import BotError
from bot.reply_stream import StreamingReply
from bot.sessions import Place
from bot.turn import Turn
from cogs.answer_actions import AnswerActions
from cogs.answer_buttons import ContinueAnswerButton, RegenerateButton, StopButton, buttons
from cogs.message_parts import place_names, quoted, read_text_files, replied_message

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

RESTARTING = "I'm restarting; please ask again in a minute."
TURN_MESSAGE_TYPES = (discord.MessageType.default, discord.MessageType.reply)
EMPTY_HINT = "Send me some text and I'll answer it."
HISTORY_LOST = "*I could not read this conversation's earlier history, so I'm starting it afresh here.*"


def place_of(channel: discord.abc.Messageable, author: discord.abc.User) -> Place | None:
    """Where a message's turn lives, or None for channels the bot does not chat in (voice, forums...)."""
    if isinstance(channel, discord.DMChannel):
        return Place(kind="dm", user_id=author.id)
    if isinstance(channel, discord.Thread):
        return Place(kind="thread", guild_id=channel.guild.id, channel_id=channel.parent_id, thread_id=channel.id)
    if isinstance(channel, discord.TextChannel):
        return Place(kind="channel", guild_id=channel.guild.id, channel_id=channel.id)
    return None


def asker_of(channel: object, user: discord.abc.User) -> Asker:
    """The IDs the access rules look at; a thread is judged by its parent channel."""
    guild = getattr(channel, "guild", None)
    if guild is None:
        return Asker(user_id=user.id)
    roles = frozenset(role.id for role in user.roles) if isinstance(user, discord.Member) else frozenset()
    if isinstance(channel, discord.Thread):
        return Asker(user.id, guild.id, channel.parent_id, channel.id, roles)
    return Asker(user.id, guild.id, getattr(channel, "id", None), None, roles)


class ChatCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.chat = bot.core.chat
        self.store = bot.core.store
        # The task answering each user message, so deleting the message cancels its answer.
        self.turn_tasks: dict[int, asyncio.Task[None]] = {}
        # The channel or thread of each of those messages, so archiving a thread cancels the answers in it.
        self.turn_channels: dict[int, int] = {}
        self.stopping = False
        self.access = AccessPolicy(bot.settings.discord)
        self.admission = Admission(per_minute=bot.settings.chat.rate_limit_per_minute)
        self.notices = NoticeGate()
        # The turn streaming the answer to each user message, for its Stop button.
        self.running: dict[int, Turn] = {}
        self.actions = AnswerActions(self)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(StopButton, RegenerateButton, ContinueAnswerButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(StopButton, RegenerateButton, ContinueAnswerButton)

    async def drain(self, grace: float) -> None:
        self.stopping = True
        running = set(self.turn_tasks.values())
        if not running:
            return
        log.info("waiting up to %.0fs for %d answers to finish", grace, len(running))
        _, late = await asyncio.wait(running, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    def is_bound_thread(self, channel: object) -> bool:
        """Whether every message here is a turn: only in threads the bot opened (/newchat), which Discord records
        as the thread's owner. Not "has a session": one mention in someone's thread must not make the bot answer
        all that is said there, and a thread whose session file broke is still the bot's."""
        me = self.bot.user
        return isinstance(channel, discord.Thread) and me is not None and channel.owner_id == me.id

    def turn_text(self, message: discord.Message) -> tuple[Place, str] | None:
        """The place and text of the turn this message is, or None when it is not addressed to the bot."""
        me = self.bot.user
        if me is None or message.author.bot or message.type not in TURN_MESSAGE_TYPES:
            return None
        place = place_of(message.channel, message.author)
        if place is None:
            return None
        mentioned = any(user.id == me.id for user in message.mentions)
        # Discord's reply to one of the bot's answers is a turn in that answer's session, mention or not.
        replied = replied_message(message)
        to_bot = replied is not None and replied.author.id == me.id
        if place.kind == "dm":
            addressed = self.bot.settings.discord.allow_dms
        elif place.kind == "thread":
            addressed = mentioned or to_bot or self.is_bound_thread(message.channel)
        else:
            addressed = mentioned or to_bot
        if not addressed:
            return None
        return place, strip_mentions_of(message.content, me.id)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        turn = self.turn_text(message)
        if turn is None:
            return
        if self.stopping:
            await self.reply(message, RESTARTING)
            return
        place, text = turn
        refusal = self.access.check(asker_of(message.channel, message.author))
        if refusal is not None:
            await self.refuse(message, refusal)
            return
        files, notes = await read_text_files(message, self.bot.settings.chat)
        if not has_visible_text(text) and not files:
            # Only a mention, only invisible characters, or only files it cannot read: nothing for the model.
            await self.reply(message, " ".join(notes) or EMPTY_HINT)
            return
        try:
            # Checked before the turn takes the session's lock: a second message from the same user is refused
            # at once instead of waiting behind their first.
            ticket = self.admission.admit(message.author.id, place.key)
        except BotError as exc:
            log.info("message %s from %s refused: %s", message.id, message.author.id, exc)
            await self.reply(message, exc.user_message)
            return
        task = asyncio.current_task()
        if task is not None:
            self.turn_tasks[message.id] = task
            self.turn_channels[message.id] = message.channel.id
        try:
            with ticket:
                await self.answer(message, place, text, ticket, files=files, notes=notes)
        finally:
            self.turn_tasks.pop(message.id, None)
            self.turn_channels.pop(message.id, None)

    async def refuse(self, message: discord.Message, refusal: Refusal) -> None:
        log.debug("message %s from %s refused by %s", message.id, message.author.id, refusal.key)
        if not refusal.quiet and self.notices.should_tell(message.author.id):
            await self.reply(message, refusal.sentence)

    async def reply(self, message: discord.Message, sentence: str) -> None:
        settings = self.bot.settings.discord
        reply = StreamingReply(message, edit_interval=settings.stream_edit_interval, ping_author=settings.ping_author)
        await self.tell(reply, sentence)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        task = self.turn_tasks.get(payload.message_id)
        if task is not None:
            log.info("message %s deleted: cancelling its answer", payload.message_id)
            task.cancel()

    @commands.Cog.listener()
    async def on_raw_thread_update(self, payload: discord.RawThreadUpdateEvent) -> None:
        if payload.data.get("thread_metadata", {}).get("archived"):
            # Quietly: a reply would unarchive the thread a moderator just closed.
            self.cancel_answers_in(payload.thread_id, "archived")

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        self.cancel_answers_in(payload.thread_id, "deleted")

    def cancel_answers_in(self, channel_id: int, why: str) -> None:
        for message_id, where in list(self.turn_channels.items()):
            task = self.turn_tasks.get(message_id)
            if where == channel_id and task is not None:
                log.info("thread %s %s: cancelling the answer to message %s", channel_id, why, message_id)
                task.cancel()

    async def answer(
        self,
        message: discord.Message,
        place: Place,
        text: str,
        ticket: AdmissionTicket,
        *,
        files: tuple[TextFile, ...] = (),
        notes: Sequence[str] = (),
    ) -> None:
        settings = self.bot.settings.discord
        reply = StreamingReply(message, edit_interval=settings.stream_edit_interval, ping_author=settings.ping_author)
        session_id = None
        replied = replied_message(message)
        if replied is not None and self.bot.user is not None and replied.author.id == self.bot.user.id:
            session_id = await self.chat.session_of_answer(place, replied.id)
        elif replied is not None:
            text = quoted(replied, text, limit=self.bot.settings.chat.reply_quote_chars)
        request = TurnInput(
            place=place,
            author_id=message.author.id,
            text=text,
            message_id=message.id,
            author_name=message.author.display_name,
            files=files,
            names=place_names(message.channel, self.bot.user),
        )
        reply.view = buttons(StopButton(message.id))
        try:
            if notes:
                await message.channel.send(" ".join(notes), reference=message, allowed_mentions=no_pings())
            # The user's slot is freed as the turn ends, however it ends: before the answer shows as final or an
            # error is told, so what they send on reading it is a turn, not "still answering".
            with ticket:
                # The turn first: it queues for the session's lock in message order (typing() awaits Discord,
                # whose replies come back in any order).
                async with self.chat.turn(request, session_id=session_id) as turn, message.channel.typing():
                    if turn.history_lost:
                        await message.channel.send(HISTORY_LOST, allowed_mentions=no_pings())
                    if turn.queued_ahead:
                        await reply.note(f"*queued: {turn.queued_ahead} ahead*")
                    await self.stream(turn, reply, message.id)
            # Only now, with the exchange in history, does the user see the answer without the streaming mark:
            # an answer shown as final is never lost to a crash.
            await self.finish(reply, turn, message.id)
        except BotError as exc:
            log.info("turn in %s refused or failed: %s", place.key, exc)
            await self.tell(reply, exc.user_message)
        except asyncio.CancelledError:
            if self.stopping:
                await self.tell(reply, "I was restarted before I could finish this answer; please ask again.")
            raise
        except discord.HTTPException as exc:
            # Discord refused a send or an edit: the turn is marked failed in history by the chat service.
            log.warning("Discord error while answering in %s: %s", place.key, exc)
            await self.tell(reply, "I could not deliver the whole answer because Discord refused a message.")

    async def stream(self, turn: Turn, reply: StreamingReply, asked: int) -> None:
        """The answer into Discord as it comes; the Stop button finds the turn under `asked` meanwhile."""
        self.running[asked] = turn
        try:
            async for delta in turn.stream():
                await reply.feed(delta)
                if reply.messages and not turn.marked:
                    await turn.mark_answering(reply.messages[0].id)
        finally:
            self.running.pop(asked, None)

    async def finish(self, reply: StreamingReply, turn: Turn, asked: int) -> None:
        regenerate = RegenerateButton(turn.session.id, asked)
        if turn.cut_at_limit:
            reply.view = buttons(regenerate, ContinueAnswerButton(turn.session.id, asked))
        else:
            reply.view = buttons(regenerate)
        await reply.finish(f"*Stopped by {turn.stopped_by or 'request'}.*" if turn.stopped else "")

    async def tell(self, reply: StreamingReply, sentence: str) -> None:
        reply.view = None  # no Stop on an answer that ended
        try:
            await reply.fail(sentence)
        except discord.HTTPException as exc:
            log.warning("could not tell the user about an error: %s", exc)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(ChatCog(bot))
