"""REST routes for the bot token: gateway info, users, commands, channels, messages, threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import permissions as perms
from .gateway import INTENT_DIRECT_MESSAGES, INTENT_GUILD_MESSAGES, INTENT_GUILDS, Gateway
from .http_util import API_PREFIX, body_of, files_of, json_response, no_content
from .model import PRIVATE_THREAD, PUBLIC_THREAD, Channel
from .store import ApiError, Store


class RestApi:
    """Handlers for the routes a bot calls with its token."""

    def __init__(self, store: Store, gateway: Gateway, *, shard_count: int, gateway_url: Callable[[], str]) -> None:
        self._store = store
        self._gateway = gateway
        self._shard_count = shard_count
        self._gateway_url = gateway_url

    def routes(self) -> list[web.RouteDef]:
        p = API_PREFIX
        return [
            web.get(p + "/gateway", self.get_gateway),
            web.get(p + "/gateway/bot", self.get_gateway_bot),
            web.get(p + "/users/@me", self.get_me),
            web.get(p + "/users/{user_id:\\d+}", self.get_user),
            web.get(p + "/oauth2/applications/@me", self.get_application),
            web.get(p + "/applications/@me", self.get_application),
            web.put(p + "/applications/{app}/commands", self.put_commands),
            web.get(p + "/applications/{app}/commands", self.get_commands),
            web.put(p + "/applications/{app}/guilds/{guild}/commands", self.put_commands),
            web.get(p + "/applications/{app}/guilds/{guild}/commands", self.get_commands),
            web.post(p + "/users/@me/channels", self.open_dm),
            web.get(p + "/guilds/{guild}/members/{user_id}", self.get_member),
            web.get(p + "/channels/{cid}", self.get_channel),
            web.patch(p + "/channels/{cid}", self.edit_channel),
            web.post(p + "/channels/{cid}/typing", self.typing),
            web.get(p + "/channels/{cid}/messages", self.list_messages),
            web.post(p + "/channels/{cid}/messages", self.create_message),
            web.get(p + "/channels/{cid}/messages/{mid}", self.get_message),
            web.patch(p + "/channels/{cid}/messages/{mid}", self.edit_message),
            web.delete(p + "/channels/{cid}/messages/{mid}", self.delete_message),
            web.put(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self.react),
            web.delete(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self.react),
            web.post(p + "/channels/{cid}/messages/{mid}/threads", self.thread_from_message),
            web.post(p + "/channels/{cid}/threads", self.thread_in_channel),
            web.get(p + "/channels/{cid}/thread-members", self.list_thread_members),
            web.get(p + "/channels/{cid}/thread-members/{user_id:\\d+}", self.get_thread_member),
            web.get("/attachments/{aid}/{filename}", self.get_attachment),
        ]

    # --- session and application ------------------------------------------------------------------
    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self._gateway_url()})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return json_response({"url": self._gateway_url(), "shards": self._shard_count, "session_start_limit": limit})

    async def get_me(self, request: web.Request) -> web.Response:
        return json_response({**self._store.bot.payload(), "verified": True, "mfa_enabled": False})

    async def get_user(self, request: web.Request) -> web.Response:
        return json_response(self._store.user(int(request.match_info["user_id"])).payload())

    async def get_application(self, request: web.Request) -> web.Response:
        bot = self._store.bot
        return json_response({
            "id": str(self._store.application_id),
            "name": bot.username,
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "owner": self._store.users[next(iter(self._store.guilds.values())).owner_id].payload()
            if self._store.guilds
            else bot.payload(),
            "flags": 0,
            "interactions_endpoint_url": None,
            "bot": bot.payload(),
        })  # fmt: skip

    async def put_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        store = self._store
        guild_id = request.match_info.get("guild")
        registry = store.global_commands if guild_id is None else store.guild_commands.setdefault(int(guild_id), {})
        old = dict(registry)
        registry.clear()
        for command in body_of(request) or []:
            previous = old.get(command["name"])
            saved = {
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                **command,
                "id": previous["id"] if previous else str(store.snowflake()),
                "application_id": str(store.application_id),
                "version": str(store.snowflake()),
            }
            if guild_id is not None:
                saved["guild_id"] = guild_id
            registry[command["name"]] = saved
        return json_response(list(registry.values()))

    async def get_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        guild_id = request.match_info.get("guild")
        store = self._store
        registry = store.global_commands if guild_id is None else store.guild_commands.get(int(guild_id), {})
        return json_response(list(registry.values()))

    def _check_app(self, request: web.Request) -> None:
        if request.match_info["app"] != str(self._store.application_id):
            raise ApiError(404, 10002, "Unknown Application")

    # --- users, members, channels -----------------------------------------------------------------
    async def open_dm(self, request: web.Request) -> web.Response:
        user = self._store.user(int(body_of(request)["recipient_id"]))
        return json_response(self._store.dm_channel(user).payload())

    async def get_member(self, request: web.Request) -> web.Response:
        guild = self._store.guilds.get(int(request.match_info["guild"]))
        member = guild.members.get(int(request.match_info["user_id"])) if guild else None
        if member is None:
            raise ApiError(404, 10007, "Unknown Member")
        return json_response(member.payload())

    def _visible_channel(self, request: web.Request) -> Channel:
        channel = self._store.channel(int(request.match_info["cid"]))
        self._store.require(channel, perms.VIEW_CHANNEL)
        return channel

    async def get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._visible_channel(request).payload())

    async def edit_channel(self, request: web.Request) -> web.Response:
        channel = self._visible_channel(request)
        body = body_of(request)
        if "name" in body:
            channel.name = body["name"]
        if "topic" in body and not channel.is_thread:
            channel.topic = body["topic"]
        if channel.is_thread:
            for key in ("archived", "locked", "auto_archive_duration"):
                if key in body:
                    setattr(channel, key, body[key])
        await self._channel_event("THREAD_UPDATE" if channel.is_thread else "CHANNEL_UPDATE", channel)
        return json_response(channel.payload())

    async def typing(self, request: web.Request) -> web.Response:
        self._store.require(self._store.channel(int(request.match_info["cid"])), perms.SEND_MESSAGES)
        return no_content()

    # --- messages ---------------------------------------------------------------------------------
    async def list_messages(self, request: web.Request) -> web.Response:
        channel = self._visible_channel(request)
        limit = int(request.query.get("limit", 50))
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        ids = sorted((i for i in self._store.messages[channel.id] if after < i < before), reverse=True)
        if "after" in request.query and "before" not in request.query:
            ids = sorted(ids)[:limit][::-1]
        return json_response([self._store.messages[channel.id][i] for i in ids[:limit]])

    async def create_message(self, request: web.Request) -> web.Response:
        store = self._store
        channel = store.channel(int(request.match_info["cid"]))
        store.require(channel, perms.SEND_MESSAGES_IN_THREADS if channel.is_thread else perms.SEND_MESSAGES)
        if channel.is_thread and channel.locked:
            raise ApiError(403, 50083, "Thread is archived")
        message = store.create_message(channel, store.bot, body_of(request), files=files_of(request))
        if channel.is_thread and channel.archived:
            channel.archived = False
            await self._channel_event("THREAD_UPDATE", channel)
        await self._gateway.dispatch_message("MESSAGE_CREATE", message)
        return json_response(message)

    def _message(self, request: web.Request) -> dict[str, Any]:
        channel = self._visible_channel(request)
        return self._store.message(channel.id, int(request.match_info["mid"]))

    async def get_message(self, request: web.Request) -> web.Response:
        return json_response(self._message(request))

    async def edit_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        if message["author"]["id"] != str(self._store.bot.id):
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._store.edit_message(message, body_of(request), files_of(request))
        await self._gateway.dispatch_message("MESSAGE_UPDATE", message)
        return json_response(message)

    async def delete_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        await self.remove_message(message)
        return no_content()

    async def remove_message(self, message: dict[str, Any]) -> None:
        self._store.delete_message(message)
        guild_id = message.get("guild_id")
        event = {"id": message["id"], "channel_id": message["channel_id"]}
        if guild_id:
            event["guild_id"] = guild_id
        intent = INTENT_GUILD_MESSAGES if guild_id else INTENT_DIRECT_MESSAGES
        await self._gateway.dispatch("MESSAGE_DELETE", event, guild_id=int(guild_id or 0) or None, intent=intent)

    async def react(self, request: web.Request) -> web.Response:
        self._message(request)
        return no_content()

    # --- threads ----------------------------------------------------------------------------------
    async def thread_from_message(self, request: web.Request) -> web.Response:
        store = self._store
        message = self._message(request)
        parent = store.channel(int(request.match_info["cid"]))
        store.require(parent, perms.CREATE_PUBLIC_THREADS)
        if "thread" in message or parent.is_thread:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        body = body_of(request)
        thread = store.add_thread(parent, body["name"], owner=store.bot, thread_id=int(message["id"]),
                                  auto_archive_duration=int(body.get("auto_archive_duration") or 1440))  # fmt: skip
        message["thread"] = thread.payload()
        await self._channel_event("THREAD_CREATE", thread, newly_created=True)
        await self._gateway.dispatch_message("MESSAGE_UPDATE", message)
        return json_response(thread.payload())

    async def thread_in_channel(self, request: web.Request) -> web.Response:
        store = self._store
        parent = store.channel(int(request.match_info["cid"]))
        body = body_of(request)
        kind = int(body.get("type") or PRIVATE_THREAD)
        store.require(parent, perms.CREATE_PUBLIC_THREADS if kind == PUBLIC_THREAD else perms.CREATE_PRIVATE_THREADS)
        thread = store.add_thread(parent, body["name"], owner=store.bot, thread_type=kind,
                                  auto_archive_duration=int(body.get("auto_archive_duration") or 1440))  # fmt: skip
        thread.invitable = bool(body.get("invitable", True))
        await self._channel_event("THREAD_CREATE", thread, newly_created=True)
        return json_response(thread.payload())

    async def get_thread_member(self, request: web.Request) -> web.Response:
        """404 10007 "Unknown Member" for someone who is not in the thread, as Discord answers."""
        thread = self._visible_channel(request)
        return json_response(self._store.thread_member(thread, int(request.match_info["user_id"])))

    async def list_thread_members(self, request: web.Request) -> web.Response:
        thread = self._visible_channel(request)
        if not thread.is_thread:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        return json_response([thread.thread_member_payload(user_id) for user_id in thread.thread_members])

    async def _channel_event(self, event: str, channel: Channel, **extra: Any) -> None:
        data = {**channel.payload(), **extra}
        await self._gateway.dispatch(event, data, guild_id=channel.guild_id, intent=INTENT_GUILDS)

    async def get_attachment(self, request: web.Request) -> web.Response:
        data = self._store.attachment_data.get(int(request.match_info["aid"]))
        if data is None:
            raise ApiError(404, 0, "404: Not Found")
        return web.Response(body=data)
