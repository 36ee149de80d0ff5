"""The emulator's world saved to one JSON file and loaded back, so a `python -m bot demo` restart keeps its server.

Restoring keeps every ID (the bot's, the guild's, the channels', the threads'), and the bot's sessions are keyed
by those IDs: after a restart the bot is in the same channels and threads, with the same history. Ephemeral
messages and DMs are not kept (Discord forgets ephemeral messages too; the page has no DMs).

Entities are encoded from their dataclass fields and decoded from their type hints, so a field added to
discord_emulator/model.py is saved and loaded without changes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import DM, Channel, Guild, User
from .store import EPHEMERAL, Store

if TYPE_CHECKING:
    from .server import DiscordEmulator

log = logging.getLogger(__name__)

FORMAT = 1
SAVE_DELAY_S = 1.0  # changes come in bursts (a streamed answer is many edits): one write per burst


def plain(value: Any) -> Any:
    """JSON-ready form of entities: dataclasses as dicts of their fields, sets as lists, keys as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return value


def build(hint: Any, data: Any) -> Any:
    """The inverse of `plain`, led by a type hint: dataclasses, lists, sets, dicts, unions with None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if data is None:
        return None
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        return build(real[0], data) if len(real) == 1 else data
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint) if f.init}
        return hint(**{k: build(hints[k], v) for k, v in data.items() if k in known})
    if origin in (list, set, frozenset, tuple):
        item = args[0] if args else Any
        return origin(build(item, v) for v in data)
    if origin is dict:
        key, item = args or (Any, Any)
        return {(int(k) if key is int else k): build(item, v) for k, v in data.items()}
    return data


def dump_world(store: Store) -> dict[str, Any]:
    channels = {cid: c for cid, c in store.channels.items() if c.type != DM}
    messages = {
        str(cid): [m for m in store.messages.get(cid, {}).values() if not int(m.get("flags") or 0) & EPHEMERAL]
        for cid in channels
    }
    return {
        "format": FORMAT,
        "bot": plain(store.bot),
        "users": [plain(u) for u in store.users.values() if u.id != store.bot.id],
        "guilds": [plain(g) for g in store.guilds.values()],
        "channels": [plain(c) for c in channels.values()],
        "messages": messages,
    }


def load_world(store: Store, data: dict[str, Any]) -> None:
    """Replaces the store's world with a saved one (before any bot connects); all or nothing."""
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown snapshot format {data.get('format')!r}")
    bot: User = build(User, data["bot"])
    users = {bot.id: bot} | {u.id: u for u in (build(User, raw) for raw in data["users"])}
    guilds: dict[int, Guild] = {g.id: g for g in (build(Guild, raw) for raw in data["guilds"])}
    channels: dict[int, Channel] = {c.id: c for c in (build(Channel, raw) for raw in data["channels"])}
    if not guilds or not channels:
        raise ValueError("no guild or no channel in it")
    messages: dict[int, dict[int, dict[str, Any]]] = {cid: {} for cid in channels}
    for cid, listed in data["messages"].items():
        messages[int(cid)] = {int(m["id"]): m for m in listed}
    store.bot, store.application_id, store.users = bot, bot.id, users
    store.guilds, store.channels, store.messages = guilds, channels, messages


def save_file(store: Store, path: Path) -> None:
    write_text(path, json.dumps(dump_world(store)))


def write_text(path: Path, text: str) -> None:
    """Writes atomically: a crash leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    temp.replace(path)


def load_file(store: Store, path: Path) -> bool:
    """Loads the world saved at `path`; False when there is none (or it cannot be read: the demo starts afresh)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        load_world(store, data)
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot load the emulator's saved world from %s (%s); starting a new one", path, exc)
        return False
    return True


@contextlib.asynccontextmanager
async def autosaved(emu: DiscordEmulator, path: Path) -> AsyncIterator[None]:
    """Saves the world to `path` shortly after each burst of changes, and once more when the block ends."""

    async def keep_saving() -> None:
        while True:
            await emu.next_change()
            await asyncio.sleep(SAVE_DELAY_S)
            # Encoded on the loop, the only place the store changes; written on a thread.
            await asyncio.to_thread(write_text, path, json.dumps(dump_world(emu.store)))

    saver = asyncio.create_task(keep_saving(), name="emulator-autosave")
    try:
        yield
    finally:
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        save_file(emu.store, path)
