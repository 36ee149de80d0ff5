"""Streams an answer into Discord: one reply edited as text arrives (at most about once a second), continued
in new messages past Discord's 2,000-character limit, every message without pings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import discord

from bot.discord_text import MESSAGE_LIMIT, no_pings, take_chunk

log = logging.getLogger(__name__)

EMPTY_ANSWER = "(The model gave an empty answer.)"
# Shown after text that is still being written; the final edit, made once the answer is stored, drops it.
STREAMING_MARK = " \u258c"


class StreamingReply:
    def __init__(
        self,
        source: discord.Message,
        *,
        edit_interval: float,
        ping_author: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rewrite: discord.Message | None = None,
    ) -> None:
        """`rewrite`: stream into this message of the bot's (a regenerated answer) instead of a new reply."""
        self.source = source
        self.edit_interval = edit_interval
        self.allowed_mentions = no_pings(ping_author=ping_author)
        self.clock = clock
        self.messages: list[discord.Message] = []
        # The part of the answer that belongs to the last message; earlier messages are final.
        self.pending = ""
        self._current: discord.Message | None = rewrite
        self._shown = ""
        self._last_edit = float("-inf")
        if rewrite is not None:
            self.messages.append(rewrite)
        # Buttons (Stop, Regenerate) ride on the answer's first message.
        self.view: discord.ui.View | None = None

    async def note(self, text: str) -> None:
        """A short status line (e.g. the queue position) that the answer will replace."""
        await self._show(text)

    async def feed(self, delta: str) -> None:
        self.pending += delta
        # Room for the streaming mark, so a message being written never goes over the limit.
        while len(self.pending) > MESSAGE_LIMIT - len(STREAMING_MARK):
            chunk, self.pending = take_chunk(self.pending)
            await self._show(chunk)
            self._current = None  # that message is full: the rest goes into a new one
            self._shown = ""
        if self.pending.strip() and self.clock() - self._last_edit >= self.edit_interval:
            await self._show(self.pending.rstrip() + STREAMING_MARK)

    async def finish(self, note: str = "") -> None:
        """The final edit: the answer without the streaming mark (and `note` after it, e.g. who stopped it)."""
        text = self.pending.strip()
        if not text and not self.messages:
            text = EMPTY_ANSWER
        if note:
            text = f"{text}\n\n{note}"[-MESSAGE_LIMIT:] if text else note
        if text:  # feed() keeps pending within one message
            await self._show(text)
        if len(self.messages) > 1:  # the buttons' message was not the one just edited
            await self.show_view(self.view)

    async def show_view(self, view: discord.ui.View | None) -> None:
        """Put `view` (or no buttons) on the answer's first message."""
        self.view = view
        if self.messages:
            first = self.messages[0]
            self.messages[0] = await first.edit(view=view)
            if self._current is first:
                self._current = self.messages[0]

    async def fail(self, sentence: str) -> None:
        """Tell the user why there is no (complete) answer, in the reply itself when there is one."""
        if self._current is not None and self.pending.strip():
            await self._show(f"{self.pending.rstrip()}\n\n*{sentence}*"[-MESSAGE_LIMIT:])
        elif self._current is not None:
            await self._show(sentence)
        else:
            await self._send(sentence)

    async def _show(self, text: str) -> None:
        if text == self._shown:
            return
        if self._current is None:
            await self._send(text)
        elif self._current is self.messages[0]:
            self._current = self.messages[0] = await self._current.edit(
                content=text, allowed_mentions=self.allowed_mentions, view=self.view
            )
        else:
            self._current = await self._current.edit(content=text, allowed_mentions=self.allowed_mentions)
        self._shown = text
        self._last_edit = self.clock()

    async def _send(self, text: str) -> None:
        channel, mentions = self.source.channel, self.allowed_mentions
        if self.messages:
            message = await channel.send(text, allowed_mentions=mentions)
        else:  # the first message replies to the user's; if theirs is gone by then, it is sent plain
            reference = self.source.to_reference(fail_if_not_exists=False)
            if self.view is None:
                message = await channel.send(text, reference=reference, allowed_mentions=mentions)
            else:
                message = await channel.send(text, reference=reference, allowed_mentions=mentions, view=self.view)
        self.messages.append(message)
        self._current = message
        self._shown = text
