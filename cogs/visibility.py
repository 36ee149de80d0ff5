"""Which sessions a member may see, by Discord's rules: a channel's sessions with the channel, a thread's with its
parent, and a private thread's only by the thread's members and by those who may manage the parent's threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol, TypeVar

import discord

from bot.sessions import Place

log = logging.getLogger(__name__)


class Listed(Protocol):
    """A session or its summary: where it lives and who started it."""

    @property
    def place(self) -> Place: ...

    @property
    def owner_id(self) -> int | None: ...


T = TypeVar("T", bound=Listed)


class ThreadDirectory:
    """The threads sessions live in, for the bot's lifetime. discord.py caches only active threads; an archived
    one costs a request, so what Discord says of it is kept: a thread's type never changes, and a deleted thread
    stays deleted."""

    def __init__(self) -> None:
        self._fetched: dict[int, discord.Thread | None] = {}

    async def thread(self, guild: discord.Guild, thread_id: int) -> discord.Thread | None:
        """The thread, or None when Discord has no such thread (or won't show it to the bot)."""
        cached = guild.get_thread(thread_id)
        if cached is not None:
            return cached
        if thread_id in self._fetched:
            return self._fetched[thread_id]
        try:
            channel = await guild.fetch_channel(thread_id)
        except discord.NotFound:
            self._fetched[thread_id] = None
            return None
        except discord.HTTPException as exc:
            # Not remembered: access can come back, and an outage passes.
            log.warning("could not look up thread %s: %s", thread_id, exc)
            return None
        thread = channel if isinstance(channel, discord.Thread) else None
        self._fetched[thread_id] = thread
        return thread


class Viewer:
    """One member's view of the sessions, for one interaction: each thread is looked up once, and a private
    thread's membership is asked of Discord once, only when the member's permissions don't settle it."""

    def __init__(self, interaction: discord.Interaction, threads: ThreadDirectory) -> None:
        self.user = interaction.user
        self.guild = interaction.guild
        self.threads = threads
        self._found: dict[int, discord.Thread | None] = {}
        self._members: dict[int, bool] = {}

    async def can_see(self, item: Listed) -> bool:
        return bool(await self.visible([item]))

    async def visible(self, items: Sequence[T]) -> list[T]:
        """`items` that the member may see, in their order."""
        settled: dict[int, bool] = {}
        pending: list[tuple[int, T]] = []
        for number, item in enumerate(items):
            answer = self._settled(item.place)
            if answer is None:
                pending.append((number, item))
            else:
                settled[number] = answer
        if pending:
            thread_ids = {item.place.thread_id for _, item in pending if item.place.thread_id is not None}
            await self._learn(sorted(thread_ids))
            for number, item in pending:
                settled[number] = self._thread_answer(item)
        return [item for number, item in enumerate(items) if settled[number]]

    def _settled(self, place: Place) -> bool | None:
        """Yes or no from what is at hand, or None when it depends on a private thread's membership."""
        if place.kind in ("dm", "console"):
            return place.kind == "dm" and place.user_id == self.user.id
        guild, member = self.guild, self.user
        if guild is None or place.guild_id != guild.id or not isinstance(member, discord.Member):
            return False
        parent = guild.get_channel(place.channel_id) if place.channel_id is not None else None
        if parent is None:
            return False
        allowed = parent.permissions_for(member)
        if not allowed.view_channel:
            return False
        # Moderators see every thread of a channel they see, private or not.
        if place.kind != "thread" or allowed.manage_threads:
            return True
        assert place.thread_id is not None
        thread = guild.get_thread(place.thread_id)
        if thread is not None and not thread.is_private():
            return True
        if thread is not None and thread.id in self._members:
            return self._members[thread.id]
        return None

    async def _learn(self, thread_ids: Sequence[int]) -> None:
        guild = self.guild
        assert guild is not None
        found = await asyncio.gather(*(self.threads.thread(guild, t) for t in thread_ids))
        self._found.update(zip(thread_ids, found, strict=True))
        private = [t for t in found if t is not None and t.is_private() and t.id not in self._members]
        answers = await asyncio.gather(*(self._is_member(t) for t in private))
        self._members.update(zip((t.id for t in private), answers, strict=True))

    def _thread_answer(self, item: Listed) -> bool:
        thread_id = item.place.thread_id
        thread = self._found.get(thread_id) if thread_id is not None else None
        if thread is None:
            # Discord no longer has the thread, so nothing says whether it was private: only the member who
            # started the session (and moderators, settled earlier) still see it.
            return item.owner_id == self.user.id
        return not thread.is_private() or self._members.get(thread.id, False)

    async def _is_member(self, thread: discord.Thread) -> bool:
        try:
            await thread.fetch_member(self.user.id)
        except discord.NotFound:
            return False
        except discord.HTTPException as exc:
            log.warning("could not check membership of thread %s: %s", thread.id, exc)
            return False
        return True
