"""The emulator's world: users, guilds, channels, messages and synced commands."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import permissions as perms
from .model import (
    DM,
    GUILD_TEXT,
    PRIVATE_THREAD,
    PUBLIC_THREAD,
    Channel,
    Guild,
    Member,
    Overwrite,
    Role,
    SnowflakeFactory,
    User,
    iso_now,
)

USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")

EPHEMERAL = 1 << 6
LOADING = 1 << 7

DEFAULT_MESSAGE = 0
REPLY = 19
CHAT_INPUT_COMMAND = 20


class ApiError(Exception):
    """A Discord error answer: HTTP status, JSON code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message


def unknown(what: str, code: int) -> ApiError:
    return ApiError(404, code, f"Unknown {what}")


@dataclass
class UploadedFile:
    """One file part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


def snowflake_of(obj: Any) -> int:
    """Accepts an entity, a message dict, or an id."""
    if isinstance(obj, dict):
        return int(obj["id"])
    if isinstance(obj, int | str):
        return int(obj)
    return int(obj.id)


class Store:
    """All state; no I/O here, so every mutation is synchronous and ordered."""

    def __init__(self, *, bot_name: str, base_url: str) -> None:
        self.snowflake = SnowflakeFactory()
        self.base_url = base_url
        self.bot = User(self.snowflake(), bot_name, bot=True)
        self.application_id = self.bot.id
        self.users: dict[int, User] = {self.bot.id: self.bot}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, dict[int, dict[str, Any]]] = {}
        self.attachment_data: dict[int, bytes] = {}
        self.global_commands: dict[str, dict[str, Any]] = {}
        self.guild_commands: dict[int, dict[str, dict[str, Any]]] = {}
        self._dm_by_user: dict[int, int] = {}

    # --- building the world -------------------------------------------------------------------------
    def add_user(self, username: str, *, bot: bool = False) -> User:
        user = User(self.snowflake(), username, bot=bot, global_name=username.title())
        self.users[user.id] = user
        return user

    def add_guild(
        self, name: str, *, owner: User | None, bot_permissions: int, shard: tuple[int, int] | None = None
    ) -> Guild:
        guild_id = self.snowflake() if shard is None else self.snowflake.on_shard(*shard)
        owner_id = owner.id if owner else self.add_user(f"{name}-owner").id
        guild = Guild(guild_id, name, owner_id)
        guild.roles[guild_id] = Role(guild_id, "@everyone", perms.DEFAULT_EVERYONE)
        bot_role = Role(self.snowflake(), self.bot.username, bot_permissions, position=1, bot_id=self.bot.id)
        guild.roles[bot_role.id] = bot_role
        guild.members[self.bot.id] = Member(self.bot, [bot_role.id])
        if owner is not None:
            guild.members[owner.id] = Member(owner)
        self.guilds[guild_id] = guild
        return guild

    def add_role(self, guild: Guild, name: str, permissions: int) -> Role:
        role = Role(self.snowflake(), name, permissions, position=len(guild.roles))
        guild.roles[role.id] = role
        return role

    def add_member(self, guild: Guild, user: User, roles: Iterable[Role | int] = (), nick: str | None = None) -> Member:
        member = Member(user, [snowflake_of(r) for r in roles], nick=nick)
        guild.members[user.id] = member
        return member

    def add_text_channel(
        self,
        guild: Guild,
        name: str,
        *,
        topic: str | None = None,
        hidden_from: Iterable[User | Role] = (),
        overwrites: Iterable[Overwrite] = (),
    ) -> Channel:
        ows = list(overwrites)
        for target in hidden_from:
            kind = perms.ROLE_OVERWRITE if isinstance(target, Role) else perms.MEMBER_OVERWRITE
            ows.append(Overwrite(target.id, kind, deny=perms.VIEW_CHANNEL))
        channel = Channel(self.snowflake(), GUILD_TEXT, name, guild.id, topic=topic, overwrites=ows,
                          position=len(guild.channel_ids))  # fmt: skip
        self._register(channel)
        return channel

    def add_thread(
        self,
        parent: Channel,
        name: str,
        *,
        owner: User,
        archived: bool = False,
        thread_type: int = PUBLIC_THREAD,
        thread_id: int | None = None,
        auto_archive_duration: int = 1440,
    ) -> Channel:
        thread = Channel(
            thread_id or self.snowflake(),
            thread_type,
            name,
            parent.guild_id,
            parent_id=parent.id,
            owner_id=owner.id,
            archived=archived,
            auto_archive_duration=auto_archive_duration,
        )
        self._register(thread)
        self.join_thread(thread, owner)
        return thread

    def join_thread(self, thread: Channel, user: User | int) -> None:
        """`user` becomes a member of `thread` (creating, writing in, or being mentioned in it does this)."""
        thread.thread_members.setdefault(snowflake_of(user), iso_now())

    def leave_thread(self, thread: Channel, user: User | int) -> None:
        thread.thread_members.pop(snowflake_of(user), None)

    def thread_member(self, thread: Channel, user_id: int) -> dict[str, Any]:
        if not thread.is_thread:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        if user_id not in thread.thread_members:
            raise unknown("Member", 10007)
        return thread.thread_member_payload(user_id)

    def _register(self, channel: Channel) -> None:
        self.channels[channel.id] = channel
        self.messages[channel.id] = {}
        if channel.guild_id is not None:
            self.guilds[channel.guild_id].channel_ids.append(channel.id)

    def dm_channel(self, user: User) -> Channel:
        channel_id = self._dm_by_user.get(user.id)
        if channel_id is None:
            channel = Channel(self.snowflake(), DM, recipient=user)
            self._register(channel)
            self._dm_by_user[user.id] = channel_id = channel.id
        return self.channels[channel_id]

    # --- lookups ----------------------------------------------------------------------------------
    def channel(self, channel_id: int) -> Channel:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise unknown("Channel", 10003) from None

    def message(self, channel_id: int, message_id: int) -> dict[str, Any]:
        try:
            return self.messages[self.channel(channel_id).id][message_id]
        except KeyError:
            raise unknown("Message", 10008) from None

    def find_message(self, message_id: int) -> dict[str, Any]:
        for by_id in self.messages.values():
            if message_id in by_id:
                return by_id[message_id]
        raise unknown("Message", 10008)

    def user(self, user_id: int) -> User:
        try:
            return self.users[user_id]
        except KeyError:
            raise unknown("User", 10013) from None

    def permissions(self, channel: Channel, user_id: int) -> int:
        if channel.guild_id is None:
            return perms.DEFAULT_EVERYONE
        parent = self.channels.get(channel.parent_id) if channel.parent_id else None
        return perms.channel_permissions(self.guilds[channel.guild_id], user_id, channel, parent)

    def require(self, channel: Channel, needed: int) -> None:
        """Raises Discord's 403s when the bot lacks a permission in the channel."""
        have = self.permissions(channel, self.bot.id)
        if not have & perms.VIEW_CHANNEL:
            raise ApiError(403, 50001, "Missing Access")
        if have & needed != needed:
            raise ApiError(403, 50013, "Missing Permissions")

    # --- messages ---------------------------------------------------------------------------------
    def _mention_payloads(self, channel: Channel, user_ids: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        guild = self.guilds.get(channel.guild_id) if channel.guild_id else None
        for uid in dict.fromkeys(user_ids):
            user = self.users.get(uid)
            if user is None:
                continue
            data = user.payload()
            if guild is not None and uid in guild.members:
                data["member"] = guild.members[uid].payload(with_user=False)
            out.append(data)
        return out

    def create_message(
        self,
        channel: Channel,
        author: User,
        body: dict[str, Any],
        *,
        files: Sequence[UploadedFile] = (),
        message_type: int = DEFAULT_MESSAGE,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Stores a message the way Discord would after a create call and returns its payload."""
        message_id = self.snowflake()
        content = str(body.get("content") or "")
        mentioned = [int(m) for m in USER_MENTION.findall(content)]
        mention_roles = ROLE_MENTION.findall(content)
        referenced = None
        ref = body.get("message_reference")
        if ref:
            try:
                referenced = self.message(int(ref.get("channel_id") or channel.id), int(ref["message_id"]))
            except ApiError:
                if ref.get("fail_if_not_exists", True):
                    raise ApiError(400, 50035, "Invalid Form Body: Unknown message") from None
            if referenced is not None:
                message_type = REPLY
        allowed = body.get("allowed_mentions")
        if author.bot and allowed is not None:
            users_ok = "users" in allowed.get("parse", [])
            listed = {int(u) for u in allowed.get("users", [])}
            mentioned = [u for u in mentioned if users_ok or u in listed]
            roles_ok = "roles" in allowed.get("parse", [])
            mention_roles = [r for r in mention_roles if roles_ok or r in allowed.get("roles", [])]
        if referenced is not None and (allowed is None or allowed.get("replied_user", False)):
            mentioned.append(int(referenced["author"]["id"]))
        message: dict[str, Any] = {
            "id": str(message_id),
            "type": message_type,
            "channel_id": str(channel.id),
            "author": author.payload(),
            "content": content,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts", False)),
            "mention_everyone": False,
            "mentions": self._mention_payloads(channel, mentioned),
            "mention_roles": mention_roles,
            "attachments": self._attachments(body, files, []),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "flags": int(body.get("flags") or 0),
        }
        if body.get("nonce") is not None:
            message["nonce"] = body["nonce"]
        if channel.guild_id is not None:
            message["guild_id"] = str(channel.guild_id)
            member = self.guilds[channel.guild_id].members.get(author.id)
            if member is not None:
                message["member"] = member.payload(with_user=False)
        if referenced is not None:
            message["message_reference"] = {"type": 0, "message_id": referenced["id"],
                                            "channel_id": referenced["channel_id"],
                                            "guild_id": referenced.get("guild_id")}  # fmt: skip
            message["referenced_message"] = {k: v for k, v in referenced.items() if k != "referenced_message"}
        message.update(extra or {})
        self.messages[channel.id][message_id] = message
        channel.last_message_id = message_id
        if channel.is_thread:
            channel.message_count += 1
            self._join_by_message(channel, author, mentioned)
        return message

    def _join_by_message(self, thread: Channel, author: User, mentioned: Sequence[int]) -> None:
        # As on Discord: writing in a thread joins it, and a mention that pings adds whoever can see the
        # parent (in a private thread only when the thread lets its members invite, or a moderator mentions).
        if self.permissions(thread, author.id) & perms.VIEW_CHANNEL:
            self.join_thread(thread, author)
        parent = self.channels.get(thread.parent_id) if thread.parent_id else None
        if parent is None or thread.guild_id is None:
            return
        guild = self.guilds[thread.guild_id]
        may_invite = thread.type != PRIVATE_THREAD or thread.invitable
        may_invite = may_invite or bool(self.permissions(parent, author.id) & perms.MANAGE_THREADS)
        for user_id in mentioned if may_invite else ():
            if user_id in guild.members and self.permissions(parent, user_id) & perms.VIEW_CHANNEL:
                self.join_thread(thread, user_id)

    def edit_message(
        self, message: dict[str, Any], body: dict[str, Any], files: Sequence[UploadedFile] = ()
    ) -> dict[str, Any]:
        for key in ("content", "embeds", "components", "flags"):
            if key in body and body[key] is not None:
                message[key] = body[key]
        if "content" in body:
            channel = self.channel(int(message["channel_id"]))
            content = str(body.get("content") or "")
            message["mentions"] = self._mention_payloads(channel, [int(m) for m in USER_MENTION.findall(content)])
        if "attachments" in body or files:
            message["attachments"] = self._attachments(body, files, message["attachments"])
        message["edited_timestamp"] = iso_now()
        return message

    def _attachments(
        self, body: dict[str, Any], files: Sequence[UploadedFile], existing: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        keep = {str(a.get("id")) for a in body.get("attachments") or []}
        out = [a for a in existing if a["id"] in keep] if "attachments" in body else list(existing)
        for upload in files:
            attachment_id = self.snowflake()
            self.attachment_data[attachment_id] = upload.data
            url = f"{self.base_url}/attachments/{attachment_id}/{upload.filename}"
            out.append({"id": str(attachment_id), "filename": upload.filename, "size": len(upload.data),
                        "url": url, "proxy_url": url, "content_type": upload.content_type})  # fmt: skip
        return out

    def delete_message(self, message: dict[str, Any]) -> None:
        del self.messages[int(message["channel_id"])][int(message["id"])]

    def snapshot(self, message: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(message)
