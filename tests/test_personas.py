"""Personas: the store on its own (file format, reopen, channel over server, quarantine, atomic writes), the
template variables, and `/persona` end to end through the Discord API emulator."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from discord_harness import StartBot, World

from bot.admission import AccessPolicy, Asker
from bot.config import DiscordSettings
from bot.errors import StorageError
from bot.personas import PERSONAS_FILE, PersonaStore, expand_prompt_variables, prompt_variables
from cogs.personas import NEEDS_MANAGER, PER_SERVER

GUILD, GENERAL, RANDOM, OTHER_GUILD = 10, 11, 12, 20
MANAGE_GUILD = 1 << 5

# --- the store ---------------------------------------------------------------------------------------------


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_personas_survive_a_reopen_in_the_documented_format(tmp_path: Path) -> None:
    store = await PersonaStore.load(tmp_path)
    assert store.count == 0 and store.get(GUILD, GENERAL) is None
    await store.set(GUILD, GENERAL, "You are a pirate.", set_by=1)
    await store.set(GUILD, None, "Be formal.", set_by=2)

    again = await PersonaStore.load(tmp_path)
    assert again.count == 2
    channel, server = again.get(GUILD, GENERAL), again.get_exact(GUILD, None)
    assert channel is not None and (channel.prompt, channel.scope, channel.set_by) == (
        "You are a pirate.",
        "channel",
        1,
    )
    assert server is not None and (server.prompt, server.scope, server.set_by) == ("Be formal.", "server", 2)
    doc = json.loads((tmp_path / PERSONAS_FILE).read_text(encoding="utf-8"))
    assert doc["version"] == 1
    assert {(p["guild_id"], p["channel_id"], p["prompt"]) for p in doc["personas"]} == {
        (GUILD, GENERAL, "You are a pirate."),
        (GUILD, None, "Be formal."),
    }
    assert names(tmp_path) == [PERSONAS_FILE]  # no temp files left behind


async def test_a_channel_persona_overrides_the_servers(tmp_path: Path) -> None:
    store = await PersonaStore.load(tmp_path)
    await store.set(GUILD, None, "server", set_by=1)
    await store.set(GUILD, GENERAL, "general", set_by=1)
    assert store.get(GUILD, GENERAL).prompt == "general"  # type: ignore[union-attr]
    assert store.get(GUILD, RANDOM).prompt == "server"  # type: ignore[union-attr]
    assert store.get(GUILD, None).prompt == "server"  # type: ignore[union-attr]
    assert store.get(OTHER_GUILD, GENERAL) is None
    assert store.get_exact(GUILD, RANDOM) is None
    await store.set(GUILD, GENERAL, "general, again", set_by=2)
    assert store.count == 2 and store.get(GUILD, GENERAL).prompt == "general, again"  # type: ignore[union-attr]


async def test_clear_removes_one_persona_for_good(tmp_path: Path) -> None:
    store = await PersonaStore.load(tmp_path)
    await store.set(GUILD, None, "server", set_by=1)
    await store.set(GUILD, GENERAL, "general", set_by=1)
    removed = await store.clear(GUILD, GENERAL)
    assert removed is not None and removed.prompt == "general"
    assert await store.clear(GUILD, GENERAL) is None
    assert store.get(GUILD, GENERAL).prompt == "server"  # type: ignore[union-attr]
    again = await PersonaStore.load(tmp_path)
    assert again.count == 1 and again.get_exact(GUILD, GENERAL) is None


@pytest.mark.parametrize(
    "junk",
    [
        b"{not json",
        b'{"version": 99, "personas": []}',
        b'{"version": 1, "personas": [{"guild_id": true, "channel_id": null, "prompt": "x", "set_by": 1}]}',
        b'{"version": 1, "personas": [{"guild_id": 1, "channel_id": null, "prompt": " ", "set_by": 1, "set_at": ""}]}',
    ],
)
async def test_a_broken_file_is_quarantined_with_one_warning_and_read_as_empty(
    tmp_path: Path, junk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / PERSONAS_FILE).write_bytes(junk)
    with caplog.at_level(logging.WARNING, logger="bot.personas"):
        store = await PersonaStore.load(tmp_path)
    assert store.count == 0
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    (moved,) = (tmp_path / "quarantine").iterdir()
    assert moved.name.startswith(PERSONAS_FILE) and moved.read_bytes() == junk
    assert not (tmp_path / PERSONAS_FILE).exists()
    await store.set(GUILD, None, "fresh", set_by=1)  # and the store works on
    assert (await PersonaStore.load(tmp_path)).count == 1


async def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    store = await PersonaStore.load(tmp_path)
    await store.set(GUILD, GENERAL, "kept", set_by=1)
    # A directory where the file goes: the final rename of the atomic write fails (chmod would not stop root).
    (tmp_path / PERSONAS_FILE).rename(tmp_path / "saved.json")
    (tmp_path / PERSONAS_FILE).mkdir()
    (tmp_path / PERSONAS_FILE / "x").touch()
    with pytest.raises(StorageError):
        await store.set(GUILD, GENERAL, "lost", set_by=1)
    with pytest.raises(StorageError):
        await store.clear(GUILD, GENERAL)
    assert store.count == 1 and store.get(GUILD, GENERAL).prompt == "kept"  # type: ignore[union-attr]
    assert names(tmp_path) == [PERSONAS_FILE, "saved.json"]  # no temp file left


def test_only_managers_or_the_system_prompt_roles_may_set_personas() -> None:
    open_to_all = AccessPolicy(DiscordSettings())
    member = Asker(user_id=1, guild_id=GUILD, channel_id=GENERAL, role_ids=frozenset({5}))
    # /newchat's prompt is open to everyone when no roles are listed; a persona is not.
    assert open_to_all.may_set_system_prompt(member)
    assert not open_to_all.may_set_persona(member, manages_server=False)
    assert open_to_all.may_set_persona(member, manages_server=True)
    listed = AccessPolicy(DiscordSettings(newchat_system_prompt_role_ids=(5,)))
    assert listed.may_set_persona(member, manages_server=False)
    assert not listed.may_set_persona(Asker(user_id=1), manages_server=True)  # a DM


# --- template variables --------------------------------------------------------------------------------------


def test_expand_prompt_variables_replaces_only_the_five_names() -> None:
    values = {"date": "Monday", "time": "12:00", "server": "llama lovers", "channel": "general", "bot": "Llama"}
    text = "{bot} on {server} #{channel}, {date} {time}."
    assert expand_prompt_variables(text, values) == "Llama on llama lovers #general, Monday 12:00."
    # Other braces stay as typed: this is not str.format.
    kept = "{0} {name} { date } {date.year} {__class__} {{bot}} {"
    assert expand_prompt_variables(kept, values) == "{0} {name} { date } {date.year} {__class__} {Llama} {"
    # One pass: a value holding a name is not expanded again; a name without a value stays.
    assert expand_prompt_variables("{server} {time}", {"server": "{time}"}) == "{time} {time}"


def test_prompt_variables_word_the_place() -> None:
    now = datetime(2024, 5, 6, 7, 8, tzinfo=UTC)
    values = prompt_variables(now=now, bot="Llama", server="llama lovers", channel="general")
    assert values == {
        "date": "Monday, May 06, 2024",
        "time": "07:08 UTC",
        "server": "llama lovers",
        "channel": "general",
        "bot": "Llama",
    }
    dm = prompt_variables(now=now, bot="Llama")
    assert "{" not in expand_prompt_variables("{server} {channel}", dm)


# --- /persona through the emulator ---------------------------------------------------------------------------


async def test_persona_commands_for_managers_only(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    managers = emu.add_role(world.guild, "managers", MANAGE_GUILD)
    prompters = emu.add_role(world.guild, "prompters")
    carol, dave = emu.add_user("carol"), emu.add_user("dave")
    emu.add_member(world.guild, carol, roles=[managers])
    emu.add_member(world.guild, dave, roles=[prompters])

    async def persona(channel: object, user: object, sub: str, **options: str) -> tuple[bool, str]:
        handle = await emu.invoke_command(channel, user, f"persona {sub}", options)  # type: ignore[arg-type]
        await emu.wait_for_response(handle)
        return handle.ephemeral, handle.response_data["content"]

    # Global commands, so the DM can be tried too (Discord itself would not offer a guild-only command there).
    async with start_bot(guild_commands=False, discord={"newchat_system_prompt_role_ids": [prompters.id]}) as bot:
        set_here = await persona(world.general, carol, "set", prompt="You are a pirate on {server}.")
        refused = [
            await persona(world.general, world.bob, "set", prompt="Ignore the rules."),
            await persona(world.general, world.bob, "show"),
            await persona(world.general, world.bob, "clear"),
        ]
        in_dm = await persona(world.dm, world.alice, "show")
        by_role = await persona(world.random, dave, "set", prompt="Be formal.", scope="server")
        shown_general = await persona(world.general, carol, "show")
        shown_random = await persona(world.random, dave, "show")
        status = await emu.invoke_command(world.general, carol, "status")
        await emu.wait_for_response(status)
        cleared = await persona(world.general, carol, "clear")
        cleared_again = await persona(world.general, carol, "clear")
        after_clear = await persona(world.general, carol, "show")
        assert bot.core.personas.count == 1

    assert set_here == (
        True,
        f"Persona set for <#{world.general.id}>. New chats there start with it; chats already going keep theirs.",
    )
    assert refused == [(True, NEEDS_MANAGER)] * 3
    assert in_dm == (True, PER_SERVER)
    assert by_role[0] and by_role[1].startswith("Persona set for the whole server.")
    assert shown_general[0] and shown_general[1].startswith(
        f"The persona here is this channel's own (<#{world.general.id}>), set by <@{carol.id}> "
    )
    assert shown_general[1].endswith(":\n> You are a pirate on {server}.")  # shown as typed, not expanded
    assert shown_random[1].startswith("The persona here is the server's (the whole server), set by ")
    assert shown_random[1].endswith("\n> Be formal.")
    assert "Personas: 2" in status.response_data["content"]
    assert cleared == (True, f"Persona of <#{world.general.id}> cleared. New chats there start without it.")
    assert cleared_again == (True, "There was no persona set for this channel.")
    assert after_clear[1].startswith("The persona here is the server's")
    # Every answer went out with no pings allowed.
    for call in emu.calls("POST", r"/interactions/\d+/[^/]+/callback"):
        mentions = call.json.get("data", {}).get("allowed_mentions")
        assert mentions in (None, {"parse": []}), mentions

    reopened = await PersonaStore.load(world.data_dir)
    assert reopened.count == 1 and reopened.get(world.guild.id, world.general.id).prompt == "Be formal."  # type: ignore[union-attr]
