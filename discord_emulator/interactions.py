"""Interactions the test starts, and what the bot answered to each."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from .model import DM, Channel, Role, User
from .store import EPHEMERAL, LOADING, ApiError, Store

APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE = 2, 3, 4
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, NUMBER = 3, 4, 5, 6, 7, 8, 10

# Interaction callback types.
CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE = 4, 5, 6, 7
AUTOCOMPLETE_RESULT, MODAL = 8, 9


@dataclass
class InteractionHandle:
    """One interaction sent to the bot; fills in as the bot answers it."""

    id: int
    token: str
    type: int
    channel_id: int
    user_id: int
    payload: dict[str, Any]
    store: Store
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)

    @property
    def responded(self) -> bool:
        return bool(self.callbacks)

    @property
    def response_type(self) -> int | None:
        return self.callbacks[0]["type"] if self.callbacks else None

    @property
    def response_data(self) -> dict[str, Any]:
        return (self.callbacks[0].get("data") or {}) if self.callbacks else {}

    @property
    def ephemeral(self) -> bool:
        """Whether the initial response (message or defer) asked for the ephemeral flag."""
        return bool(int(self.response_data.get("flags") or 0) & EPHEMERAL)

    @property
    def choices(self) -> list[dict[str, Any]]:
        """Autocomplete choices the bot returned."""
        return list(self.response_data.get("choices") or [])

    def original(self) -> dict[str, Any] | None:
        """The original response message as Discord holds it now (after edits)."""
        if self.original_message_id is None:
            return None
        try:
            return self.store.message(self.channel_id, self.original_message_id)
        except ApiError:
            return None

    def followups(self) -> list[dict[str, Any]]:
        out = []
        for message_id in self.followup_ids:
            try:
                out.append(self.store.message(self.channel_id, message_id))
            except ApiError:
                continue
        return out

    def is_loading(self) -> bool:
        original = self.original()
        return original is not None and bool(original["flags"] & LOADING)


def _option_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, User):
        return USER
    if isinstance(value, Role):
        return ROLE
    if isinstance(value, Channel):
        return CHANNEL
    return STRING


def build_options(
    store: Store,
    channel: Channel,
    schema: list[dict[str, Any]],
    values: dict[str, Any],
    focused: str | None,
    resolved: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Typed option payloads; entity values also go into `resolved` the way Discord sends them."""
    types = {o["name"]: int(o["type"]) for o in schema}
    out = []
    for name, value in values.items():
        kind = types.get(name, _option_type(value))
        option: dict[str, Any] = {"name": name, "type": kind}
        if isinstance(value, User):
            option["value"] = str(value.id)
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            guild = store.guilds.get(channel.guild_id) if channel.guild_id else None
            if guild is not None and value.id in guild.members:
                member = guild.members[value.id].payload(with_user=False)
                resolved.setdefault("members", {})[str(value.id)] = member
        elif isinstance(value, Role | Channel):
            option["value"] = str(value.id)
            key, data = ("roles", value.payload()) if isinstance(value, Role) else ("channels", value.payload())
            resolved.setdefault(key, {})[str(value.id)] = data
        else:
            option["value"] = value
        if name == focused:
            option["focused"] = True
            option["value"] = str(value)
        out.append(option)
    return out


def command_data(
    store: Store, channel: Channel, name: str, values: dict[str, Any], focused: str | None
) -> dict[str, Any]:
    """data for an application command; `name` may be "group sub" for subcommands."""
    root, *path = name.split()
    guild_cmds = store.guild_commands.get(channel.guild_id or 0, {})
    command = guild_cmds.get(root) or store.global_commands.get(root)
    if command is None:
        synced = sorted({*store.global_commands, *guild_cmds})
        raise LookupError(f"command {root!r} was never synced to Discord (synced: {synced})")
    resolved: dict[str, dict[str, Any]] = {}
    schema: list[dict[str, Any]] = command.get("options") or []
    wrappers: list[dict[str, Any]] = []
    for part in path:
        sub = next((o for o in schema if o["name"] == part), None)
        if sub is None:
            raise LookupError(f"{root!r} has no subcommand {part!r}")
        wrappers.append({"name": part, "type": int(sub["type"]), "options": []})
        schema = sub.get("options") or []
    options = build_options(store, channel, schema, values, focused, resolved)
    for wrapper in reversed(wrappers):
        wrapper["options"] = options
        options = [wrapper]
    data: dict[str, Any] = {"id": command["id"], "name": root, "type": 1, "options": options}
    if "guild_id" in command:
        data["guild_id"] = command["guild_id"]
    if resolved:
        data["resolved"] = resolved
    return data


def interaction_payload(
    store: Store, kind: int, channel: Channel, user: User, data: dict[str, Any], message: dict[str, Any] | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(store.snowflake()),
        "application_id": str(store.application_id),
        "type": kind,
        "data": data,
        "token": secrets.token_urlsafe(24),
        "version": 1,
        "channel_id": str(channel.id),
        "channel": channel.payload(),
        "app_permissions": str(store.permissions(channel, store.bot.id)),
        "locale": "en-US",
        "entitlements": [],
        "attachment_size_limit": 10 * 1024 * 1024,
    }
    if channel.type == DM:
        payload.update(user=user.payload(), context=1, authorizing_integration_owners={"1": str(user.id)})
    else:
        guild = store.guilds[channel.guild_id or 0]
        member = guild.members.get(user.id)
        if member is None:
            raise LookupError(f"{user.username} is not a member of {guild.name}")
        payload.update(
            guild_id=str(guild.id),
            guild={"id": str(guild.id), "locale": "en-US", "features": []},
            guild_locale="en-US",
            member={**member.payload(), "permissions": str(store.permissions(channel, user.id))},
            context=0,
            authorizing_integration_owners={"0": str(guild.id)},
        )
    if message is not None:
        payload["message"] = message
    return payload


def find_component(components: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
    for component in components:
        if component.get("custom_id") == custom_id:
            return component
        found = find_component(component.get("components") or [], custom_id)
        if found is not None:
            return found
    return None
