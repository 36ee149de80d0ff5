"""DiscordEmulator: an aiohttp server speaking enough Discord v10 REST + gateway for discord.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

from . import permissions as perms
from .gateway import INTENT_GUILDS, Gateway
from .http_util import API_PREFIX, BODY, FILES, error_response, json_response, read_body
from .interactions import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    MESSAGE_COMPONENT,
    InteractionHandle,
    command_data,
    find_component,
    interaction_payload,
)
from .model import PRIVATE_THREAD, PUBLIC_THREAD, Channel, Guild, Member, Role, User
from .recording import FailureRule, HoldRule, RecordedCall
from .rest import RestApi
from .rest_interactions import InteractionApi
from .store import EPHEMERAL, ApiError, Store, snowflake_of
from .web import DemoPage

log = logging.getLogger(__name__)

T = TypeVar("T")
TOKEN_FREE_PREFIXES = ("/interactions/", "/webhooks/")
# GET /gateway needs no token on Discord either (GET /gateway/bot does).
TOKEN_FREE_PATHS = ("/gateway",)


class DiscordEmulator:
    """A fake Discord on 127.0.0.1:<random port>; point discord.py at it with `use_api_base(emu.api_base)`
    (bot/discord_api.py), as `run_bot` does."""

    def __init__(
        self,
        *,
        token: str = "emulator-token",
        bot_name: str = "llama-bot",
        shard_count: int = 1,
        strict: bool = True,
        port: int = 0,
        message_content_intent: bool = True,
        heartbeat_interval_ms: int = 41250,
    ) -> None:
        self.token = token
        self.shard_count = shard_count
        self.strict = strict
        self.port = port
        self.store = Store(bot_name=bot_name, base_url="")
        self.gateway = Gateway(
            self.store,
            token=token,
            url=lambda: self.gateway_url,
            on_change=self._notify,
            message_content_intent=message_content_intent,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self._rest = RestApi(self.store, self.gateway, shard_count=shard_count, gateway_url=lambda: self.gateway_url)
        self._interactions = InteractionApi(self.store, self.gateway, self._rest)
        self._calls: list[RecordedCall] = []
        self._failures: list[FailureRule] = []
        self._holds: list[HoldRule] = []
        self.internal_errors: list[str] = []
        self.unknown_routes: list[str] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.page = DemoPage(self)  # the web page at / and its API under /_demo/ (web.py)

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.add_routes([web.get("/gateway", self.gateway.handle), *self._rest.routes(), *self._interactions.routes(),
                        *self.page.routes()])  # fmt: skip
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.store.base_url = self.url
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.debug("Discord emulator listening on %s", self.url)

    async def close(self) -> None:
        if self._runner is None:
            return
        self.gateway.release_connections()
        await self.gateway.close_all(code=1001)
        await self.page.close()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        if exc is None:
            self.check()

    def check(self) -> None:
        """Fails when the emulator hit its own bug, or (strict) the bot called a route it lacks."""
        problems = list(self.internal_errors)
        if self.strict:
            problems += [f"unknown route {route}" for route in self.unknown_routes]
        if problems:
            raise AssertionError("Discord emulator problems:\n" + "\n".join(problems))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def bot_user(self) -> User:
        return self.store.bot

    @property
    def application_id(self) -> int:
        return self.store.application_id

    # --- the HTTP pipeline ------------------------------------------------------------------------
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        api = request.path.startswith(API_PREFIX)
        path = request.path[len(API_PREFIX) :] if api else request.path
        body, files = await read_body(request)
        call = RecordedCall(request.method, path, dict(request.query), body, files, asyncio.get_running_loop().time())
        if api:
            self._calls.append(call)
        request[BODY], request[FILES] = body, files
        try:
            response = self._injected_failure(call)
            if response is None:
                needs_token = api and not path.startswith(TOKEN_FREE_PREFIXES) and path not in TOKEN_FREE_PATHS
                if needs_token and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise ApiError(401, 0, "401: Unauthorized")
                response = await handler(request)
        except ApiError as err:
            response = error_response(err.status, err.code, err.message)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            log.warning("Discord emulator has no route for %s %s", request.method, path)
            self.unknown_routes.append(f"{request.method} {path}")
            # Never a 5xx: discord.py retries those with sleeps.
            response = error_response(404, 0, "404: Not Found")
        except Exception as exc:
            self.internal_errors.append(f"{request.method} {path}: {traceback.format_exc()}")
            response = error_response(400, 0, f"emulator error: {exc!r}")
        call.status = response.status
        self._notify()
        for hold in list(self._holds):
            if hold.take(call):
                await hold.released.wait()
        return response

    def _injected_failure(self, call: RecordedCall) -> web.Response | None:
        for rule in self._failures:
            if rule.take(call):
                if rule.status == 429:
                    extra = {"retry_after": rule.retry_after, "global": False}
                    return error_response(429, 0, "You are being rate limited.", **extra)
                return json_response(rule.body or {"message": "injected failure", "code": 0}, rule.status)
        return None

    async def next_change(self) -> None:
        """Returns at the emulator's next change: a REST call answered, an event injected, a gateway connection."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- building the world -----------------------------------------------------------------------
    def add_user(self, username: str, *, bot: bool = False) -> User:
        return self.store.add_user(username, bot=bot)

    def add_guild(
        self,
        name: str = "test guild",
        *,
        owner: User | None = None,
        bot_permissions: int = perms.DEFAULT_BOT,
        shard_id: int | None = None,
    ) -> Guild:
        """A guild; `shard_id` picks an ID whose events go to that shard (of this emulator's shard_count)."""
        if shard_id is not None and not 0 <= shard_id < self.shard_count:
            raise ValueError(f"shard_id {shard_id} is not below shard_count {self.shard_count}")
        shard = None if shard_id is None else (shard_id, self.shard_count)
        return self.store.add_guild(name, owner=owner, bot_permissions=bot_permissions, shard=shard)

    def add_role(self, guild: Guild, name: str, permissions: int = 0) -> Role:
        return self.store.add_role(guild, name, permissions)

    def add_member(self, guild: Guild, user: User, roles: Iterable[Role | int] = (), nick: str | None = None) -> Member:
        return self.store.add_member(guild, user, roles, nick)

    def add_text_channel(
        self, guild: Guild, name: str, *, topic: str | None = None, hidden_from: Iterable[User | Role] = ()
    ) -> Channel:
        return self.store.add_text_channel(guild, name, topic=topic, hidden_from=hidden_from)

    def add_thread(self, parent: Channel, name: str, *, owner: User | None = None, archived: bool = False) -> Channel:
        """A thread that exists before the bot connects (it arrives in GUILD_CREATE unless archived)."""
        return self.store.add_thread(parent, name, owner=owner or self.store.bot, archived=archived)

    def channel(self, channel: Channel | int) -> Channel:
        return self.store.channel(snowflake_of(channel))

    def threads_of(self, parent: Channel | int) -> list[Channel]:
        parent_id = snowflake_of(parent)
        return [c for c in self.store.channels.values() if c.is_thread and c.parent_id == parent_id]

    def dm_channel(self, user: User) -> Channel:
        return self.store.dm_channel(user)

    # --- events the test injects ------------------------------------------------------------------
    async def send_message(
        self,
        channel: Channel | int,
        author: User,
        content: str,
        *,
        reply_to: dict[str, Any] | None = None,
        embeds: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A user posts in a channel, thread or DM; dispatches MESSAGE_CREATE and returns the message."""
        target = self.channel(channel)
        body: dict[str, Any] = {"content": content, "embeds": embeds or []}
        if reply_to is not None:
            body["message_reference"] = {"message_id": reply_to["id"], "channel_id": reply_to["channel_id"]}
        message = self.store.create_message(target, author, body)
        if target.is_thread and target.archived:
            target.archived = False
            await self._channel_event("THREAD_UPDATE", target)
        await self.gateway.dispatch_message("MESSAGE_CREATE", message)
        self._notify()
        return message

    async def send_dm(self, user: User, content: str) -> dict[str, Any]:
        return await self.send_message(self.store.dm_channel(user), user, content)

    async def edit_message(self, message: dict[str, Any], content: str) -> dict[str, Any]:
        """A user edits their own message; dispatches MESSAGE_UPDATE."""
        stored = self.store.message(int(message["channel_id"]), int(message["id"]))
        self.store.edit_message(stored, {"content": content})
        await self.gateway.dispatch_message("MESSAGE_UPDATE", stored)
        self._notify()
        return stored

    async def delete_message(self, message: dict[str, Any]) -> None:
        """A user or moderator deletes a message; dispatches MESSAGE_DELETE."""
        await self._rest.remove_message(self.store.message(int(message["channel_id"]), int(message["id"])))
        self._notify()

    async def create_thread(
        self,
        parent: Channel | int,
        owner: User,
        name: str,
        *,
        from_message: dict[str, Any] | None = None,
        private: bool = False,
    ) -> Channel:
        """A user starts a thread (public, or `private`: seen by its members and moderators); dispatches
        THREAD_CREATE (newly_created)."""
        target = self.channel(parent)
        thread_id = int(from_message["id"]) if from_message else None
        kind = PRIVATE_THREAD if private else PUBLIC_THREAD
        thread = self.store.add_thread(target, name, owner=owner, thread_id=thread_id, thread_type=kind)
        await self._channel_event("THREAD_CREATE", thread, newly_created=True)
        if from_message is not None:
            stored = self.store.message(target.id, int(from_message["id"]))
            stored["thread"] = thread.payload()
            await self.gateway.dispatch_message("MESSAGE_UPDATE", stored)
        self._notify()
        return thread

    async def archive_thread(self, thread: Channel | int, archived: bool = True) -> None:
        target = self.channel(thread)
        target.archived = archived
        await self._channel_event("THREAD_UPDATE", target)
        self._notify()

    async def _channel_event(self, event: str, channel: Channel, **extra: Any) -> None:
        await self.gateway.dispatch(
            event, {**channel.payload(), **extra}, guild_id=channel.guild_id, intent=INTENT_GUILDS
        )

    async def invoke_command(
        self, channel: Channel | int, user: User, name: str, options: dict[str, Any] | None = None
    ) -> InteractionHandle:
        """A user runs a synced slash command ("cmd" or "group sub"); dispatches INTERACTION_CREATE."""
        target = self.channel(channel)
        data = command_data(self.store, target, name, options or {}, focused=None)
        return await self._interact(APPLICATION_COMMAND, target, user, data, None)

    async def autocomplete(
        self, channel: Channel | int, user: User, name: str, options: dict[str, Any], focused: str
    ) -> InteractionHandle:
        """A user types into option `focused`; the handle's `choices` fill in when the bot answers."""
        target = self.channel(channel)
        data = command_data(self.store, target, name, options, focused=focused)
        return await self._interact(AUTOCOMPLETE, target, user, data, None)

    async def click_button(self, message: dict[str, Any], user: User, custom_id: str) -> InteractionHandle:
        return await self.use_component(message, user, custom_id)

    async def select(self, message: dict[str, Any], user: User, custom_id: str, values: list[str]) -> InteractionHandle:
        return await self.use_component(message, user, custom_id, values=values)

    async def use_component(
        self, message: dict[str, Any], user: User, custom_id: str, *, values: list[str] | None = None
    ) -> InteractionHandle:
        """A user clicks a button or picks from a select menu on a message the bot sent."""
        stored = self.store.message(int(message["channel_id"]), int(message["id"]))
        component = find_component(stored.get("components") or [], custom_id)
        if component is None:
            raise LookupError(f"message {stored['id']} has no component {custom_id!r}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if values is not None:
            data["values"] = values
        return await self._interact(MESSAGE_COMPONENT, self.channel(int(stored["channel_id"])), user, data, stored)

    async def _interact(
        self, kind: int, channel: Channel, user: User, data: dict[str, Any], message: dict[str, Any] | None
    ) -> InteractionHandle:
        payload = interaction_payload(self.store, kind, channel, user, data, message)
        handle = InteractionHandle(int(payload["id"]), payload["token"], kind, channel.id, user.id, payload, self.store)
        self._interactions.add(handle)
        await self.gateway.dispatch("INTERACTION_CREATE", payload, guild_id=channel.guild_id, intent=0)
        self._notify()
        return handle

    # --- faults -----------------------------------------------------------------------------------
    def fail_next(
        self,
        path_pattern: str,
        *,
        method: str | None = None,
        status: int = 500,
        times: int = 1,
        retry_after: float = 0.0,
        body: dict[str, Any] | None = None,
    ) -> FailureRule:
        """Answer the next `times` requests matching (fullmatch on the path after /api/v10) with an error."""
        rule = FailureRule(method.upper() if method else None, path_pattern, status, times, retry_after, body)
        self._failures.append(rule)
        return rule

    @contextlib.asynccontextmanager
    async def slow_responses(
        self, path_pattern: str, *, method: str | None = None, when: Callable[[RecordedCall], bool] | None = None
    ) -> AsyncIterator[HoldRule]:
        """Matching requests are carried out at once (their effect shows in the store and to observers) but their
        responses wait until the block ends: a slow network or a slow Discord, as the client sees it."""
        rule = HoldRule(method.upper() if method else None, path_pattern, when)
        self._holds.append(rule)
        try:
            yield rule
        finally:
            self._holds.remove(rule)
            rule.released.set()

    async def close_gateway(self, code: int = 4000) -> None:
        """Drops every gateway connection; discord.py reconnects and RESUMEs (or re-IDENTIFYs)."""
        await self.gateway.close_all(code=code)

    @contextlib.asynccontextmanager
    async def gateway_outage(self, code: int = 4000) -> AsyncIterator[None]:
        """The gateway is gone while the block runs: every connection is dropped with `code`, and the bot's
        reconnects hang before HELLO until the block ends (then it RESUMEs and gets the missed events).
        REST keeps working, as it does when only Discord's gateway is down."""
        self.gateway.hold_connections()
        try:
            await self.gateway.close_all(code=code)
            yield
        finally:
            self.gateway.release_connections()

    # --- inspection -------------------------------------------------------------------------------
    def calls(self, method: str | None = None, path_pattern: str | None = None) -> list[RecordedCall]:
        """Recorded REST calls; `path_pattern` is a regex fullmatched against e.g. "/channels/1/messages"."""
        return [c for c in self._calls if c.matches(method, path_pattern)]

    def messages_in(self, channel: Channel | int, *, include_ephemeral: bool = True) -> list[dict[str, Any]]:
        """The channel's messages, oldest first, as Discord holds them now."""
        messages = sorted(self.store.messages[self.channel(channel).id].items())
        return [m for _, m in messages if include_ephemeral or not int(m["flags"]) & EPHEMERAL]

    def message(self, channel: Channel | int, message_id: int | str) -> dict[str, Any]:
        return self.store.message(self.channel(channel).id, int(message_id))

    def bot_messages_in(self, channel: Channel | int) -> list[dict[str, Any]]:
        bot_id = str(self.store.bot.id)
        return [m for m in self.messages_in(channel) if m["author"]["id"] == bot_id]

    async def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,  # noqa: ASYNC109 - a default keeps a broken scenario from hanging the suite
        what: str = "condition",
    ) -> T:
        """Waits until predicate() is truthy (re-checked on every change) and returns its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            # A short cap too: predicates may depend on the bot's own state, not only ours.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.05))

    async def wait_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Waits until every shard has identified (READY and GUILD_CREATEs sent)."""
        expected = set(range(self.shard_count))
        await self.wait_for(lambda: self.gateway.ready_shards() >= expected, timeout, "all shards to identify")

    async def wait_for_call(
        self,
        method: str | None,
        path_pattern: str,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> RecordedCall:
        """Waits until at least `count` matching calls were recorded; returns the `count`-th."""
        found = await self.wait_for(
            lambda: (c := self.calls(method, path_pattern)) and len(c) >= count and c,
            timeout,
            f"{method} {path_pattern}",
        )
        return found[count - 1]

    async def wait_for_message(
        self,
        channel: Channel | int,
        *,
        after: dict[str, Any] | None = None,
        author: User | None = None,
        check: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """The first message in `channel` newer than `after`, by `author` (default: the bot)."""
        author_id = str((author or self.store.bot).id)
        after_id = int(after["id"]) if after else 0

        def first() -> dict[str, Any] | None:
            for message in self.messages_in(channel):
                newer = int(message["id"]) > after_id and message["author"]["id"] == author_id
                if newer and (check is None or check(message)):
                    return message
            return None

        return await self.wait_for(first, timeout, f"a message in channel {snowflake_of(channel)}")

    async def wait_for_response(
        self,
        handle: InteractionHandle,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> InteractionHandle:
        await self.wait_for(lambda: handle.responded, timeout, f"a response to interaction {handle.id}")
        return handle

    def intents_of(self, shard_id: int = 0) -> int:
        return self.gateway.active[shard_id].intents
