"""The web page that shows the emulator as a Discord client would, and its small API under /_demo/.

    GET  /                     the page (static/index.html, app.js, style.css: vanilla JS, no build step)
    GET  /_demo/state          the servers: channels, threads, messages, members, synced commands; the bot online?
    GET  /_demo/events         websocket: that state first, then each message create/update/delete and
                               channel, command and presence change, as the emulator holds them after the bot's calls
    POST /_demo/messages       {user_id, channel_id, content}: that user posts (`@name` becomes a mention)
    POST /_demo/commands       {user_id, channel_id, name, options}: that user runs a slash command
    POST /_demo/autocomplete   {user_id, channel_id, name, options, focused}: the bot's choices for that option
    POST /_demo/components     {user_id, message_id, custom_id, values?}: a button click or select on a message

The page shows what the bot sent: every message comes from the emulator's store, never from the page itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from . import permissions as perms
from .http_util import body_of, json_response
from .interactions import BOOLEAN, INTEGER, NUMBER, InteractionHandle
from .model import Channel, User
from .store import ApiError
from .web_feed import PageFeed

if TYPE_CHECKING:
    from .server import DiscordEmulator

STATIC = Path(__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
NAME_MENTION = re.compile(r"(?<![<\w])@([\w.-]+)")
# Discord gives a bot three seconds to answer an interaction before the client says it did not respond.
RESPONSE_TIMEOUT_S = 3.0


def bad_request(problem: str) -> ApiError:
    return ApiError(400, 50035, f"Invalid Form Body: {problem}")


class DemoPage:
    """Routes of the page and its API; `feed` pushes the emulator's changes to every open page."""

    def __init__(self, emu: DiscordEmulator) -> None:
        self._emu = emu
        self.feed = PageFeed(emu)
        self._sockets: set[web.WebSocketResponse] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/favicon.ico", self.favicon),
            web.get("/static/{name}", self.static),
            web.get("/_demo/state", self.state),
            web.get("/_demo/events", self.events),
            web.post("/_demo/messages", self.post_message),
            web.post("/_demo/commands", self.run_command),
            web.post("/_demo/autocomplete", self.autocomplete),
            web.post("/_demo/components", self.use_component),
        ]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"the emulator is stopping")
        await self.feed.close()

    # --- the page ---------------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def favicon(self, request: web.Request) -> web.Response:
        return self._file("favicon.svg")

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        path = STATIC / name
        # Only the files shipped in static/, by plain name: no path from the request reaches the disk.
        if name not in {p.name for p in STATIC.iterdir()} or path.suffix not in CONTENT_TYPES:
            raise ApiError(404, 0, "404: Not Found")
        headers = {"Cache-Control": "no-cache"}
        return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[path.suffix], headers=headers)

    async def state(self, request: web.Request) -> web.Response:
        return json_response(self.feed.state())

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._sockets.add(ws)
        queue = self.feed.subscribe()
        pump = asyncio.create_task(self._pump(queue, ws), name="demo-page-socket")
        try:
            async for msg in ws:  # the page sends nothing; reading notices when it goes away
                if msg.type is WSMsgType.ERROR:
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            self.feed.unsubscribe(queue)
            self._sockets.discard(ws)
        return ws

    async def _pump(self, queue: asyncio.Queue[str], ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            frame = await queue.get()
            with contextlib.suppress(ConnectionError):
                await ws.send_str(frame)

    # --- acting as a user -------------------------------------------------------------------------------
    def _actor(self, body: dict[str, Any]) -> tuple[User, Channel]:
        """The user and the channel of a request; the user must be a member who can see the channel."""
        store = self._emu.store
        try:
            user, channel = store.user(int(body["user_id"])), store.channel(int(body["channel_id"]))
        except (KeyError, TypeError, ValueError):
            raise bad_request("user_id and channel_id are required") from None
        guild = store.guilds.get(channel.guild_id or 0)
        if guild is None or user.id not in guild.members or user.bot:
            raise ApiError(403, 50001, "Missing Access")
        if not store.permissions(channel, user.id) & perms.VIEW_CHANNEL:
            raise ApiError(403, 50001, "Missing Access")
        return user, channel

    def _with_mentions(self, text: str, channel: Channel) -> str:
        """`@alice` or `@llama-bot` becomes the mention Discord's client would send for it."""
        guild = self._emu.store.guilds[channel.guild_id or 0]
        by_name = {}
        for member in guild.members.values():
            by_name[member.user.username.lower()] = member.user
            if member.user.global_name:
                by_name.setdefault(member.user.global_name.lower(), member.user)

        def swap(match: re.Match[str]) -> str:
            user = by_name.get(match.group(1).lower())
            return user.mention if user else match.group(0)

        return NAME_MENTION.sub(swap, text)

    async def post_message(self, request: web.Request) -> web.Response:
        body = body_of(request)
        user, channel = self._actor(body)
        content = self._with_mentions(str(body.get("content") or ""), channel)
        if not content.strip():
            raise ApiError(400, 50006, "Cannot send an empty message")
        if len(content) > 4000:
            raise bad_request("content must be 4000 or fewer in length")
        message = await self._emu.send_message(channel, user, content)
        return json_response(message)

    def _options(self, channel: Channel, name: str, raw: Any) -> dict[str, Any]:
        """The page sends text; options are typed as the synced command declares them."""
        if not isinstance(raw, dict):
            raise bad_request("options must be an object")
        store = self._emu.store
        command = store.guild_commands.get(channel.guild_id or 0, {}).get(name) or store.global_commands.get(name)
        types = {o["name"]: int(o["type"]) for o in (command or {}).get("options") or []}
        options: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or value == "":
                continue
            kind = types.get(key)
            try:
                if kind == INTEGER:
                    value = int(value)
                elif kind == NUMBER:
                    value = float(value)
                elif kind == BOOLEAN:
                    value = str(value).lower() in ("true", "yes", "1")
            except ValueError:
                raise bad_request(f"option {key} must be a number") from None
            options[key] = value
        return options

    async def run_command(self, request: web.Request) -> web.Response:
        body = body_of(request)
        user, channel = self._actor(body)
        name = str(body.get("name") or "")
        options = self._options(channel, name.split(" ")[0], body.get("options") or {})
        try:
            handle = await self._emu.invoke_command(channel, user, name, options)
        except LookupError as exc:
            raise bad_request(str(exc)) from None
        self.feed.commands_run[str(handle.id)] = name
        return json_response(await self._answered(handle))

    async def autocomplete(self, request: web.Request) -> web.Response:
        body = body_of(request)
        user, channel = self._actor(body)
        name, focused = str(body.get("name") or ""), str(body.get("focused") or "")
        options = {k: str(v) for k, v in (body.get("options") or {}).items()}
        options.setdefault(focused, "")
        try:
            handle = await self._emu.autocomplete(channel, user, name, options, focused)
        except LookupError as exc:
            raise bad_request(str(exc)) from None
        answer = await self._answered(handle)
        return json_response({**answer, "choices": handle.choices})

    async def use_component(self, request: web.Request) -> web.Response:
        body = body_of(request)
        store = self._emu.store
        try:
            message = store.find_message(int(body["message_id"]))
            user = store.user(int(body["user_id"]))
        except (KeyError, TypeError, ValueError):
            raise bad_request("user_id and message_id are required") from None
        self._actor({"user_id": user.id, "channel_id": message["channel_id"]})
        values = body.get("values")
        try:
            handle = await self._emu.use_component(message, user, str(body.get("custom_id")), values=values)
        except LookupError as exc:
            raise bad_request(str(exc)) from None
        return json_response(await self._answered(handle))

    async def _answered(self, handle: InteractionHandle) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            await self._emu.wait_for_response(handle, timeout=RESPONSE_TIMEOUT_S)
        return {"interaction_id": str(handle.id), "responded": handle.responded}
