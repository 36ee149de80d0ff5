"""The server `python -m bot demo` (and `python -m discord_emulator`) shows: #general and #random, and three people
to type as, alice (an administrator, so `/status` answers her), bob and carol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import permissions as perms
from .model import GUILD_TEXT, Channel, Guild, User
from .snapshot import load_file, save_file

if TYPE_CHECKING:
    from .server import DiscordEmulator

GUILD_NAME = "llama lounge"
PEOPLE = ("alice", "bob", "carol")
CHANNELS = {"general": "Mention @llama-bot to ask it something", "random": "Anything goes"}


@dataclass(frozen=True)
class DemoWorld:
    guild: Guild
    general: Channel
    people: dict[str, User]


def build_demo_world(emu: DiscordEmulator) -> DemoWorld:
    guild = emu.add_guild(GUILD_NAME)
    admin = emu.add_role(guild, "admin", perms.ADMINISTRATOR)
    people = {}
    for name in PEOPLE:
        people[name] = user = emu.add_user(name)
        emu.add_member(guild, user, roles=[admin] if name == "alice" else [])
    channels = [emu.add_text_channel(guild, name, topic=topic) for name, topic in CHANNELS.items()]
    return DemoWorld(guild, channels[0], people)


def open_demo_world(emu: DiscordEmulator, path: Path | None) -> tuple[DemoWorld, bool]:
    """The world saved at `path` (so IDs, threads and messages survive a restart), else a new one saved there.
    Also says whether it was restored."""
    if path is not None and load_file(emu.store, path):
        store = emu.store
        guild = next(iter(store.guilds.values()))
        channels = [store.channels[c] for c in guild.channel_ids if store.channels[c].type == GUILD_TEXT]
        general = next((c for c in channels if c.name == "general"), channels[0])
        members = [m.user for m in guild.members.values() if not m.user.bot]
        return DemoWorld(guild, general, {u.username: u for u in members}), True
    world = build_demo_world(emu)
    if path is not None:
        save_file(emu.store, path)
    return world, False
