"""The gateway websocket: HELLO, IDENTIFY/RESUME, heartbeats and sequenced dispatches per shard."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .model import Channel, Guild
from .permissions import VIEW_CHANNEL
from .store import Store

log = logging.getLogger(__name__)

HELLO, HEARTBEAT, IDENTIFY, RESUME, REQUEST_MEMBERS = 10, 1, 2, 6, 8
DISPATCH, HEARTBEAT_ACK, INVALID_SESSION = 0, 11, 9

INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
CONTENT_KEYS = ("content", "embeds", "attachments", "components")
# Discord's acks cross a network. discord.py's keep-alive thread notes a heartbeat's send time only after the send
# returns, so an ack handled before that (an instant one from this process) is timed from the previous heartbeat:
# "websocket is 41.2s behind". A real network's delay, and the warning goes.
HEARTBEAT_ACK_DELAY_S = 0.05


class Connection:
    """One websocket; sends are serialised so frames never interleave."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.lock = asyncio.Lock()

    async def send(self, frame: str) -> bool:
        async with self.lock:
            if self.ws.closed:
                return False
            try:
                await self.ws.send_str(frame)
            except ConnectionError:
                return False
            return True


@dataclass
class GatewaySession:
    """A Discord session: outlives its websocket so RESUME can replay what was missed."""

    session_id: str
    shard_id: int
    shard_count: int
    intents: int
    conn: Connection | None = None
    seq: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)

    def handles_guild(self, guild_id: int | None) -> bool:
        if guild_id is None:
            return self.shard_id == 0
        return (guild_id >> 22) % self.shard_count == self.shard_id

    async def dispatch(self, event: str, data: Any) -> None:
        self.seq += 1
        frame = json.dumps({"op": DISPATCH, "t": event, "s": self.seq, "d": data})
        self.log.append((self.seq, frame))
        if self.conn is not None:
            await self.conn.send(frame)


def guild_create_payload(store: Store, guild: Guild) -> dict[str, Any]:
    channels = [store.channels[c] for c in guild.channel_ids]

    def visible(thread: Channel) -> bool:
        # A private thread only if the bot is a member or may manage threads.
        return bool(store.permissions(thread, store.bot.id) & VIEW_CHANNEL)

    return {
        "id": str(guild.id),
        "name": guild.name,
        "owner_id": str(guild.owner_id),
        "icon": None,
        "unavailable": False,
        "large": False,
        "member_count": len(guild.members),
        "joined_at": guild.members[store.bot.id].joined_at,
        "roles": [r.payload() for r in guild.roles.values()],
        "members": [m.payload() for m in guild.members.values()],
        "channels": [c.payload() for c in channels if not c.is_thread],
        "threads": [c.payload() for c in channels if c.is_thread and not c.archived and visible(c)],
        "features": [],
        "emojis": [],
        "stickers": [],
        "presences": [],
        "voice_states": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
        "preferred_locale": "en-US",
        "premium_tier": 0,
        "system_channel_id": None,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
    }


class Gateway:
    """Accepts shard connections and routes dispatches to the shard that owns each guild."""

    def __init__(
        self,
        store: Store,
        *,
        token: str,
        url: Callable[[], str],
        on_change: Callable[[], None],
        heartbeat_interval_ms: int = 41250,
        message_content_intent: bool = True,
    ) -> None:
        """`message_content_intent`: the Developer Portal's switch; when off, an IDENTIFY that asks for the intent
        is closed with 4014, as Discord closes it."""
        self._store = store
        self._token = token
        self._url = url
        self._on_change = on_change
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._message_content_intent = message_content_intent
        self.sessions: dict[str, GatewaySession] = {}
        self.active: dict[int, GatewaySession] = {}
        self.identify_count = 0
        self.resume_count = 0
        self._connections: set[Connection] = set()
        # Cleared during an outage: new connections then get no HELLO until it is set again.
        self._up = asyncio.Event()
        self._up.set()

    def hold_connections(self) -> None:
        """Start an outage: connections made from now on wait, without HELLO, until `release_connections`."""
        self._up.clear()

    def release_connections(self) -> None:
        self._up.set()

    def ready_shards(self) -> set[int]:
        return {shard for shard, s in self.active.items() if s.conn is not None and not s.conn.ws.closed}

    async def dispatch(self, event: str, data: dict[str, Any], *, guild_id: int | None, intent: int) -> None:
        for session in list(self.active.values()):
            if session.handles_guild(guild_id) and session.intents & intent == intent:
                await session.dispatch(event, data)

    async def dispatch_message(self, event: str, message: dict[str, Any]) -> None:
        """MESSAGE_CREATE/UPDATE, hiding content from sessions without the MESSAGE_CONTENT intent."""
        guild_id = int(message["guild_id"]) if "guild_id" in message else None
        intent = INTENT_GUILD_MESSAGES if guild_id else INTENT_DIRECT_MESSAGES
        bot_id = str(self._store.bot.id)
        privileged = (
            guild_id is None
            or message["author"]["id"] == bot_id
            or any(m["id"] == bot_id for m in message.get("mentions", []))
        )
        for session in list(self.active.values()):
            if not session.handles_guild(guild_id) or session.intents & intent != intent:
                continue
            data = message
            if not privileged and not session.intents & INTENT_MESSAGE_CONTENT:
                data = {**message, "content": "", "embeds": [], "attachments": [], "components": []}
            await session.dispatch(event, data)

    async def close_all(self, code: int) -> None:
        for conn in list(self._connections):
            await conn.ws.close(code=code, message=b"emulator closed the connection")

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = Connection(ws)
        self._connections.add(conn)
        session: GatewaySession | None = None
        try:
            await self._up.wait()
            await conn.send(json.dumps({"op": HELLO, "d": {"heartbeat_interval": self._heartbeat_interval_ms},
                                        "s": None, "t": None}))  # fmt: skip
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op, data = payload.get("op"), payload.get("d")
                if op == HEARTBEAT:
                    await asyncio.sleep(HEARTBEAT_ACK_DELAY_S)
                    await conn.send(json.dumps({"op": HEARTBEAT_ACK, "d": None, "s": None, "t": None}))
                elif op == IDENTIFY:
                    session = await self._identify(conn, data)
                elif op == RESUME:
                    session = await self._resume(conn, data)
                elif op == REQUEST_MEMBERS and session is not None:
                    await self._send_members(session, data)
        finally:
            self._connections.discard(conn)
            if session is not None and session.conn is conn:
                session.conn = None
            self._on_change()
        return ws

    async def _identify(self, conn: Connection, data: dict[str, Any]) -> GatewaySession | None:
        if data.get("token") != self._token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return None
        if int(data.get("intents", 0)) & INTENT_MESSAGE_CONTENT and not self._message_content_intent:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        shard_id, shard_count = data.get("shard") or [0, 1]
        if not 0 <= shard_id < shard_count:
            await conn.ws.close(code=4010, message=b"Invalid shard.")
            return None
        session = GatewaySession(uuid.uuid4().hex, shard_id, shard_count, int(data.get("intents", 0)), conn)
        self.sessions[session.session_id] = session
        self.active[shard_id] = session
        self.identify_count += 1
        store = self._store
        guilds = [g for g in store.guilds.values() if session.handles_guild(g.id)]
        await session.dispatch(
            "READY",
            {
                "v": 10,
                "user": {**store.bot.payload(), "verified": True, "mfa_enabled": False, "bot": True},
                "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
                "session_id": session.session_id,
                "resume_gateway_url": self._url(),
                "shard": [shard_id, shard_count],
                "application": {"id": str(store.application_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "session_type": "normal",
                "user_settings": {},
                "auth": {},
            },
        )
        for guild in guilds:
            await session.dispatch("GUILD_CREATE", guild_create_payload(store, guild))
        self._on_change()
        return session

    async def _resume(self, conn: Connection, data: dict[str, Any]) -> GatewaySession | None:
        session = self.sessions.get(data.get("session_id", ""))
        if session is None or data.get("token") != self._token:
            await conn.send(json.dumps({"op": INVALID_SESSION, "d": False, "s": None, "t": None}))
            return None
        session.conn = conn
        self.active[session.shard_id] = session
        self.resume_count += 1
        last_seen = data.get("seq") or 0
        for seq, frame in list(session.log):
            if seq > last_seen:
                await conn.send(frame)
        await session.dispatch("RESUMED", {})
        self._on_change()
        return session

    async def _send_members(self, session: GatewaySession, data: dict[str, Any]) -> None:
        guild = self._store.guilds.get(int(data["guild_id"]))
        if guild is None:
            return
        chunk = {
            "guild_id": str(guild.id),
            "members": [m.payload() for m in guild.members.values()],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce"):
            chunk["nonce"] = data["nonce"]
        await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)
