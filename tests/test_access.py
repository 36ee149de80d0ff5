"""Access control through the real bot and the Discord emulator: `[discord] allowed_guild_ids`,
`allowed_channel_ids`, `allowed_role_ids`, `blocked_user_ids` and `newchat_system_prompt_role_ids`, each with
what a refused user gets (nothing, one notice, or an ephemeral sentence), plus session isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from discord_harness import bot_settings, finished_session, running_chat_bot

from bot.admission import (
    BLOCKED,
    DM_NEEDS_ROLE,
    NEEDS_ROLE,
    OTHER_CHANNEL,
    OTHER_GUILD,
    SYSTEM_PROMPT_NEEDS_ROLE,
    AccessPolicy,
    Asker,
)
from bot.client import ChatBot
from bot.config import DiscordSettings
from bot.sessions import Place, Session
from cogs.sessions import NEWCHAT_NEEDS_THREAD_SENDING, NEWCHAT_NEEDS_THREADS
from discord_emulator import Channel, DiscordEmulator, Guild, InteractionHandle, Role, User, running_emulator
from discord_emulator import permissions as perms
from discord_emulator.model import Overwrite


@dataclass
class World:
    emu: DiscordEmulator
    guild: Guild
    other_guild: Guild
    general: Channel
    random: Channel
    secret: Channel
    elsewhere: Channel
    chatters: Role
    prompters: Role
    alice: User  # chatters and prompters
    bob: User  # no roles; can't see #secret
    carol: User  # no roles
    data_dir: Path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_emulator() as emu:
        guild = emu.add_guild("llama lovers")
        other_guild = emu.add_guild("other place")
        chatters = emu.add_role(guild, "chatters")
        prompters = emu.add_role(guild, "prompters")
        alice, bob, carol = emu.add_user("alice"), emu.add_user("bob"), emu.add_user("carol")
        emu.add_member(guild, alice, roles=[chatters, prompters])
        emu.add_member(guild, bob)
        emu.add_member(guild, carol)
        emu.add_member(other_guild, alice, roles=[])
        general = emu.add_text_channel(guild, "general")
        random = emu.add_text_channel(guild, "random")
        secret = emu.add_text_channel(guild, "secret", hidden_from=[bob])
        elsewhere = emu.add_text_channel(other_guild, "elsewhere")
        yield World(
            emu, guild, other_guild, general, random, secret, elsewhere, chatters, prompters, alice, bob, carol,
            tmp_path / "data",
        )  # fmt: skip


StartBot = Callable[..., AbstractAsyncContextManager[ChatBot]]


@pytest.fixture
def start_bot(world: World, tiny_llama_dir: Path) -> StartBot:
    def start(*, guild_commands: bool = True, **discord: Any) -> Any:
        # Commands synced globally (guild_commands=False) are the ones that also work in DMs.
        guild_ids = (world.guild.id, world.other_guild.id) if guild_commands else ()
        settings = bot_settings(world.emu, tiny_llama_dir, world.data_dir, guild_ids=guild_ids, discord=discord)
        return running_chat_bot(world.emu, settings)

    return start


async def mention(world: World, channel: Channel, author: User, text: str) -> dict[str, Any]:
    return await world.emu.send_message(channel, author, f"{world.emu.bot_user.mention} {text}")


async def answered(bot: ChatBot, place: Place, *, turns: int = 1) -> Session:
    return await finished_session(bot, place, turns=turns, timeout=120)


def channel_place(guild: Guild, channel: Channel) -> Place:
    return Place(kind="channel", guild_id=guild.id, channel_id=channel.id)


async def command(world: World, channel: Channel, user: User, name: str, **options: str) -> InteractionHandle:
    handle = await world.emu.invoke_command(channel, user, name, options)
    # A deferred answer (/newchat in a channel) is done when its "thinking..." message is replaced.
    # A bound for a broken bot only, generous for a busy machine.
    await world.emu.wait_for(lambda: handle.responded and not handle.is_loading(), timeout=60, what=f"/{name}")
    return handle


def posts(world: World, channel: Channel) -> list[str]:
    """What the bot posted in the channel itself (not interaction responses)."""
    return [str(c.json.get("content")) for c in world.emu.calls("POST", rf"/channels/{channel.id}/messages")]


def said(handle: InteractionHandle) -> str:
    return str(handle.response_data.get("content"))


# --- the rules alone --------------------------------------------------------------------------------------


def test_empty_lists_allow_everyone() -> None:
    policy = AccessPolicy(DiscordSettings())
    assert policy.check(Asker(1, guild_id=2, channel_id=3)) is None
    assert policy.check(Asker(1)) is None
    assert policy.may_set_system_prompt(Asker(1, guild_id=2, channel_id=3))


def test_each_list_refuses_what_it_leaves_out() -> None:
    policy = AccessPolicy(
        DiscordSettings(
            allowed_guild_ids=(10,),
            allowed_channel_ids=(20,),
            allowed_role_ids=(30,),
            blocked_user_ids=(666,),
            newchat_system_prompt_role_ids=(40,),
        )
    )
    member = Asker(1, guild_id=10, channel_id=20, role_ids=frozenset({30}))
    assert policy.check(member) is None
    assert policy.check(Asker(1, guild_id=10, channel_id=20, thread_id=21, role_ids=frozenset({30}))) is None
    assert policy.check(Asker(666, guild_id=10, channel_id=20, role_ids=frozenset({30}))) is BLOCKED
    assert policy.check(Asker(1, guild_id=11, channel_id=20, role_ids=frozenset({30}))) is OTHER_GUILD
    assert policy.check(Asker(1, guild_id=10, channel_id=22, thread_id=21, role_ids=frozenset({30}))) is OTHER_CHANNEL
    assert policy.check(Asker(1, guild_id=10, channel_id=20, role_ids=frozenset({31}))) is NEEDS_ROLE
    assert policy.check(Asker(1)) is DM_NEEDS_ROLE
    assert policy.check(Asker(666)) is BLOCKED
    assert not policy.may_set_system_prompt(member)
    assert policy.may_set_system_prompt(Asker(1, guild_id=10, channel_id=20, role_ids=frozenset({30, 40})))
    assert not policy.may_set_system_prompt(Asker(1))
    assert BLOCKED.quiet and OTHER_GUILD.quiet and OTHER_CHANNEL.quiet
    assert not NEEDS_ROLE.quiet and not DM_NEEDS_ROLE.quiet


# --- through Discord --------------------------------------------------------------------------------------


async def test_allowed_guild_ids(world: World, start_bot: StartBot) -> None:
    async with start_bot(allowed_guild_ids=[world.guild.id]) as bot:
        await mention(world, world.elsewhere, world.alice, "hello over there")
        refused = await command(world, world.elsewhere, world.alice, "history")
        await mention(world, world.general, world.alice, "hello here")
        await answered(bot, channel_place(world.guild, world.general))
        assert await bot.core.store.current(channel_place(world.other_guild, world.elsewhere)) is None
    assert posts(world, world.elsewhere) == []
    assert refused.ephemeral and said(refused) == OTHER_GUILD.sentence


async def test_allowed_channel_ids_and_threads_inherit_them(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(allowed_channel_ids=[world.general.id]) as bot:
        refused = await command(world, world.random, world.alice, "newchat", topic="not here")
        assert refused.ephemeral and said(refused) == OTHER_CHANNEL.sentence
        assert emu.threads_of(world.random) == []
        # A thread someone opened under a channel that is not allowed is not allowed either.
        side_thread = await emu.create_thread(world.random, world.alice, "side talk")
        await mention(world, side_thread, world.alice, "in a side thread")
        await mention(world, world.random, world.alice, "in random")

        created = await command(world, world.general, world.alice, "newchat", topic="allowed")
        assert not created.ephemeral
        (thread,) = emu.threads_of(world.general)
        await emu.send_message(thread, world.alice, "in the thread of general")
        place = Place(kind="thread", guild_id=world.guild.id, channel_id=world.general.id, thread_id=thread.id)
        session = await answered(bot, place)
        assert await bot.core.store.current(channel_place(world.guild, world.random)) is None
    assert session.messages[0].content == "in the thread of general"
    assert posts(world, world.random) == []
    assert posts(world, side_thread) == []


async def test_allowed_role_ids(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(allowed_role_ids=[world.chatters.id]) as bot:
        first = await mention(world, world.general, world.bob, "may I?")
        notice = await emu.wait_for_message(world.general, after=first, timeout=60)
        await mention(world, world.general, world.bob, "and now?")  # told once: no second notice
        await emu.send_dm(world.carol, "hello in private")
        dm_notice = await emu.wait_for_message(emu.dm_channel(world.carol), timeout=60)
        listing = await command(world, world.general, world.bob, "history")
        await mention(world, world.general, world.alice, "I have the role")
        session = await answered(bot, channel_place(world.guild, world.general))
    assert notice["content"] == NEEDS_ROLE.sentence
    assert notice["message_reference"]["message_id"] == first["id"]
    assert dm_notice["content"] == DM_NEEDS_ROLE.sentence
    assert listing.ephemeral and said(listing) == NEEDS_ROLE.sentence
    assert [m.content for m in session.messages if m.role == "user"] == ["I have the role"]
    bot_posts = posts(world, world.general)
    assert bot_posts.count(NEEDS_ROLE.sentence) == 1
    assert len(bot_posts) == 2  # the one notice and alice's answer


async def test_blocked_user_ids(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(blocked_user_ids=[world.carol.id]) as bot:
        await mention(world, world.general, world.alice, "a public session")
        public = await answered(bot, channel_place(world.guild, world.general))
        await mention(world, world.general, world.carol, "let me in")
        await emu.send_dm(world.carol, "or here")
        listing = await command(world, world.general, world.carol, "history")
        peek = await command(world, world.general, world.carol, "history", session=public.id)
        completion = await emu.autocomplete(world.general, world.carol, "history", {"session": ""}, focused="session")
        await emu.wait_for_response(completion, timeout=60)
        await mention(world, world.general, world.alice, "still here?")
        await answered(bot, channel_place(world.guild, world.general), turns=2)
        assert await bot.core.store.current(Place(kind="dm", user_id=world.carol.id)) is None
    assert posts(world, emu.dm_channel(world.carol)) == []
    assert len(posts(world, world.general)) == 2  # alice's two answers, nothing for carol
    assert listing.ephemeral and said(listing) == BLOCKED.sentence
    assert peek.ephemeral and said(peek) == BLOCKED.sentence and "a public session" not in said(peek)
    assert completion.choices == []


async def test_newchat_system_prompt_role_ids(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(guild_commands=False, newchat_system_prompt_role_ids=[world.prompters.id]) as bot:
        refused = await command(world, world.general, world.bob, "newchat", topic="mine", system_prompt="Be evil.")
        assert emu.threads_of(world.general) == []
        plain = await command(world, world.general, world.bob, "newchat", topic="plain")
        in_dm = await command(world, emu.dm_channel(world.bob), world.bob, "newchat", system_prompt="Be evil.")
        allowed = await command(world, world.general, world.alice, "newchat", topic="pirate", system_prompt="Arr.")
        threads = {t.name: t for t in emu.threads_of(world.general)}
        sessions = {
            name: await bot.core.store.current(
                Place(kind="thread", guild_id=world.guild.id, channel_id=world.general.id, thread_id=t.id)
            )
            for name, t in threads.items()
        }
        assert await bot.core.store.current(Place(kind="dm", user_id=world.bob.id)) is None
    assert refused.ephemeral and said(refused) == SYSTEM_PROMPT_NEEDS_ROLE
    assert in_dm.ephemeral and said(in_dm) == SYSTEM_PROMPT_NEEDS_ROLE
    assert not plain.ephemeral and not allowed.ephemeral
    assert set(threads) == {"plain", "pirate"}
    plain_session, pirate_session = sessions["plain"], sessions["pirate"]
    assert plain_session is not None and plain_session.system_prompt == "Be brief."  # the configured default
    assert pirate_session is not None and pirate_session.system_prompt == "Arr."


# --- session isolation ------------------------------------------------------------------------------------


async def test_a_thread_of_a_hidden_channel_stays_hidden(world: World, start_bot: StartBot) -> None:
    """A session in a thread is judged by the thread's parent: bob can't see #secret, so not its threads either,
    not in /history, not by guessing the ID, not in autocomplete."""
    emu = world.emu
    async with start_bot() as bot:
        await command(world, world.secret, world.alice, "newchat", topic="covert")
        (thread,) = emu.threads_of(world.secret)
        await emu.send_message(thread, world.alice, "the plan is ready")
        place = Place(kind="thread", guild_id=world.guild.id, channel_id=world.secret.id, thread_id=thread.id)
        hidden = await answered(bot, place)
        bob_list = await command(world, world.general, world.bob, "history")
        bob_guess = await command(world, world.general, world.bob, "history", session=hidden.id)
        completion = await emu.autocomplete(world.general, world.bob, "history", {"session": "cov"}, focused="session")
        await emu.wait_for_response(completion, timeout=60)
        alice_list = await command(world, world.general, world.alice, "history")
    assert hidden.id not in said(bob_list) and "covert" not in said(bob_list)
    assert "No session with that ID" in said(bob_guess) and "the plan" not in said(bob_guess)
    assert completion.choices == []
    assert hidden.id in said(alice_list)


async def test_newchat_needs_the_callers_own_permissions(world: World, start_bot: StartBot) -> None:
    """Where bob may not write, or not open threads, /newchat does not do it for him with the bot's rights;
    alice, who may, gets her thread in the same places."""
    emu = world.emu

    def denied_to_bob(name: str, deny: int) -> Channel:
        bob_overwrite = Overwrite(world.bob.id, perms.MEMBER_OVERWRITE, deny=deny)
        return emu.store.add_text_channel(world.guild, name, overwrites=[bob_overwrite])

    read_only = denied_to_bob("read-only", perms.SEND_MESSAGES)
    no_threads = denied_to_bob("no-threads", perms.CREATE_PUBLIC_THREADS)
    quiet_threads = denied_to_bob("quiet-threads", perms.SEND_MESSAGES_IN_THREADS)
    async with start_bot() as bot:
        refused_read_only = await command(world, read_only, world.bob, "newchat", topic="mine")
        refused_no_threads = await command(world, no_threads, world.bob, "newchat", topic="mine")
        assert emu.threads_of(read_only) == [] and emu.threads_of(no_threads) == []
        await command(world, quiet_threads, world.alice, "newchat", topic="alice's")
        (thread,) = emu.threads_of(quiet_threads)
        place = Place(kind="thread", guild_id=world.guild.id, channel_id=quiet_threads.id, thread_id=thread.id)
        first = await bot.core.store.current(place)
        refused_in_thread = await command(world, thread, world.bob, "newchat", topic="take over")
        unchanged = await bot.core.store.current(place)
        allowed = [
            await command(world, channel, world.alice, "newchat", topic="ok") for channel in (read_only, no_threads)
        ]
    assert refused_read_only.ephemeral and said(refused_read_only) == NEWCHAT_NEEDS_THREADS
    assert refused_no_threads.ephemeral and said(refused_no_threads) == NEWCHAT_NEEDS_THREADS
    assert refused_in_thread.ephemeral and said(refused_in_thread) == NEWCHAT_NEEDS_THREAD_SENDING
    assert first is not None and unchanged is not None and unchanged.id == first.id
    assert not any(handle.ephemeral for handle in allowed)
    assert [t.name for t in emu.threads_of(read_only)] == ["ok"] and [t.name for t in emu.threads_of(no_threads)] == [
        "ok"
    ]
