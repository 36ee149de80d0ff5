"""What the web page sees: the emulator's world as JSON, and the changes to it pushed to every open page.

The feed compares the world with what it last sent each time the emulator changes (a REST call answered, an event
injected), so the page shows exactly what Discord holds after the bot's calls: its streamed edits as they land,
its ephemeral answers, its buttons. It runs only while a page is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from . import permissions as perms
from .model import DM, Channel, Guild

if TYPE_CHECKING:
    from .server import DiscordEmulator

Event = dict[str, Any]


def person(emu: DiscordEmulator, guild: Guild, user_id: int) -> dict[str, Any]:
    member = guild.members[user_id]
    roles = [guild.roles[r].name for r in member.role_ids if r in guild.roles]
    admin = bool(perms.base_permissions(guild, user_id) & perms.ADMINISTRATOR)
    return {**member.user.payload(), "nick": member.nick, "roles": roles, "admin": admin}


class PageFeed:
    def __init__(self, emu: DiscordEmulator) -> None:
        self._emu = emu
        # Interaction ID -> the command's name, for the "alice used /newchat" line above a response.
        self.commands_run: dict[str, str] = {}
        self._queues: set[asyncio.Queue[str]] = set()
        self._seen: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # --- the world as the page reads it ---------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        store = self._emu.store
        return {
            "bot": store.bot.payload(),
            "online": self._online(),
            "guilds": [self._guild(g) for g in store.guilds.values()],
        }

    def _guild(self, guild: Guild) -> dict[str, Any]:
        store = self._emu.store
        channels = [store.channels[c] for c in guild.channel_ids if c in store.channels]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "members": [person(self._emu, guild, uid) for uid in guild.members],
            "channels": [self.channel(c) for c in channels],
            "messages": {str(c.id): [self.message(m) for m in sorted_messages(store.messages[c.id])] for c in channels},
            "commands": self._commands(guild.id),
        }

    def _commands(self, guild_id: int) -> list[dict[str, Any]]:
        store = self._emu.store
        return [*store.guild_commands.get(guild_id, {}).values(), *store.global_commands.values()]

    def channel(self, channel: Channel) -> dict[str, Any]:
        """The channel's payload, and who of the guild's members can see it (private threads, hidden channels)."""
        return {**channel.payload(), "visible_to": [str(uid) for uid in self._viewers(channel)]}

    def _viewers(self, channel: Channel) -> list[int]:
        store = self._emu.store
        guild = store.guilds[channel.guild_id or 0]
        return [uid for uid in guild.members if store.permissions(channel, uid) & perms.VIEW_CHANNEL]

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        meta = message.get("interaction_metadata") or {}
        command = self.commands_run.get(str(meta.get("id")))
        return {**message, "demo_command": command} if command else message

    def _online(self) -> bool:
        return bool(self._emu.gateway.ready_shards())

    # --- what changed since the last look -------------------------------------------------------------
    def changes(self) -> list[Event]:
        store = self._emu.store
        current: dict[tuple[str, int], tuple[Any, ...]] = {("online", 0): (self._online(),)}
        payloads: dict[tuple[str, int], Event] = {("online", 0): {"type": "online", "online": self._online()}}
        for guild in store.guilds.values():
            key = ("commands", guild.id)
            commands = self._commands(guild.id)
            current[key] = tuple((c["name"], c["version"]) for c in commands)
            payloads[key] = {"type": "commands", "guild_id": str(guild.id), "commands": commands}
        for channel in store.channels.values():
            if channel.type == DM:
                continue
            key = ("channel", channel.id)
            viewers = tuple(self._viewers(channel))
            current[key] = (channel.name, channel.type, channel.archived, channel.locked, channel.topic, viewers)
            payloads[key] = {"type": "channel", "channel": self.channel(channel)}
            for message_id, message in store.messages.get(channel.id, {}).items():
                key = ("message", message_id)
                edit = (message["edited_timestamp"], message["flags"], message["content"], "thread" in message)
                current[key] = (channel.id, *edit)
                payloads[key] = {"type": "message", "message": self.message(message)}
        events = [payloads[k] for k, v in current.items() if self._seen.get(k) != v]
        for kind, ident in self._seen.keys() - current.keys():
            if kind == "message":
                channel_id = self._seen[(kind, ident)][0]  # a message's fingerprint starts with its channel
                events.append({"type": "delete", "channel_id": str(channel_id), "id": str(ident)})
        self._seen = current
        return events

    # --- pages listening ------------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[str]:
        """A page's queue of JSON frames: the whole state first, then each change."""
        self._broadcast(self.changes())  # pages already open get what is new before the newcomer's baseline
        queue: asyncio.Queue[str] = asyncio.Queue()
        queue.put_nowait(json.dumps({"type": "state", "state": self.state()}))
        self._queues.add(queue)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="demo-page-feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._queues.discard(queue)
        if not self._queues and self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            await self._emu.next_change()
            self._broadcast(self.changes())

    def _broadcast(self, events: list[Event]) -> None:
        for event in events:
            frame = json.dumps(event)
            for queue in self._queues:
                queue.put_nowait(frame)


def sorted_messages(messages: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [messages[i] for i in sorted(messages)]
