"""Threads through the real bot and the Discord emulator: who sees a private thread's session in /history, which
threads are the bot's (every message a turn) and which only answer mentions, and a /newchat thread whose session
file broke."""

from __future__ import annotations

from typing import Any

from discord_harness import StartBot, World, finished_session, mention, thread_place

from bot.client import ChatBot
from bot.sessions import Session
from cogs.chat import HISTORY_LOST
from cogs.sessions import NOT_FOUND
from discord_emulator import Channel, InteractionHandle, User
from discord_emulator import permissions as perms


async def command(world: World, channel: Channel, user: User, name: str, **options: str) -> InteractionHandle:
    handle = await world.emu.invoke_command(channel, user, name, options)
    # A bound for a broken bot only, generous for a busy machine.
    await world.emu.wait_for(lambda: handle.responded and not handle.is_loading(), timeout=60, what=f"/{name}")
    return handle


async def choices(world: World, user: User, typed: str) -> list[str]:
    handle = await world.emu.autocomplete(world.general, user, "history", {"session": typed}, focused="session")
    await world.emu.wait_for_response(handle, timeout=60)
    return [str(choice["value"]) for choice in handle.choices]


def said(handle: InteractionHandle) -> str:
    return str(handle.response_data.get("content"))


def membership_checks(world: World, thread: Channel, user: User) -> int:
    return len(world.emu.calls("GET", rf"/channels/{thread.id}/thread-members/{user.id}"))


async def answered(bot: ChatBot, world: World, thread: Channel, *, turns: int = 1) -> Session:
    """The thread's current session once `turns` user messages are in it, the last is answered and its asker may
    ask again (a mention sent sooner is refused as a second message while the first is being answered)."""
    return await finished_session(bot, thread_place(world, thread), turns=turns, timeout=120)


async def user_messages(bot: ChatBot, world: World, thread: Channel, turns: int) -> list[str]:
    session = await answered(bot, world, thread, turns=turns)
    return [m.content for m in session.messages if m.role == "user"]


# --- private threads ---------------------------------------------------------------------------------------


async def test_a_private_threads_session_is_seen_only_by_its_members_and_moderators(
    world: World, start_bot: StartBot
) -> None:
    """Discord's rule for private threads, in /history's list, its autocomplete and `session:ID` alike: bob sees
    #general but is not in alice's private thread; carol may manage threads. Bob still sees a public session."""
    emu = world.emu
    carol = emu.add_user("carol")
    emu.add_member(world.guild, carol, roles=[emu.add_role(world.guild, "mods", perms.MANAGE_THREADS)])
    async with start_bot() as bot:
        private = await emu.create_thread(world.general, world.alice, "surprise party", private=True)
        await mention(world, private, world.alice, "plan the surprise party")
        hidden = await answered(bot, world, private)
        public = await emu.create_thread(world.general, world.alice, "open talk")
        await mention(world, public, world.alice, "anyone may read this")
        shown = await answered(bot, world, public)

        bob_list = await command(world, world.general, world.bob, "history")
        bob_guess = await command(world, world.general, world.bob, "history", session=hidden.id)
        bob_choices = await choices(world, world.bob, "")
        checks_for_bob = membership_checks(world, private, world.bob)
        alice_list = await command(world, world.general, world.alice, "history")
        alice_transcript = await command(world, world.general, world.alice, "history", session=hidden.id)
        carol_list = await command(world, world.general, carol, "history")

        # Archived, the thread leaves discord.py's cache: the bot asks Discord what it is, once, and still knows.
        await emu.archive_thread(private)
        archived_guess = await command(world, world.general, world.bob, "history", session=hidden.id)
        archived_choices = await choices(world, world.bob, "")
        archived_alice = await command(world, world.general, world.alice, "history", session=hidden.id)
    assert hidden.id not in said(bob_list) and "surprise" not in said(bob_list)
    assert shown.id in said(bob_list)
    assert said(bob_guess) == NOT_FOUND and said(archived_guess) == NOT_FOUND
    assert bob_choices == [shown.id] and archived_choices == [shown.id]
    assert hidden.id in said(alice_list) and "plan the surprise party" in said(alice_transcript)
    assert "plan the surprise party" in said(archived_alice)
    assert hidden.id in said(carol_list)
    # What it costs: one membership question per interaction for bob, none for carol (her role settles it), and
    # Discord answers bob's as it does, 404 Unknown Member.
    assert checks_for_bob == 3
    assert membership_checks(world, private, carol) == 0
    assert {c.status for c in emu.calls("GET", rf"/channels/{private.id}/thread-members/{world.bob.id}")} == {404}
    assert len(emu.calls("GET", rf"/channels/{private.id}")) == 1


async def test_the_emulator_keeps_private_threads_to_their_members(world: World) -> None:
    emu = world.emu
    thread = await emu.create_thread(world.general, world.alice, "just us", private=True)
    assert emu.store.permissions(thread, world.bob.id) == 0
    assert emu.store.permissions(thread, world.alice.id) & perms.VIEW_CHANNEL
    # A mention that pings adds the mentioned member, as on Discord.
    await emu.send_message(thread, world.alice, f"{world.bob.mention} join us")
    assert emu.store.permissions(thread, world.bob.id) & perms.VIEW_CHANNEL
    assert set(thread.thread_members) == {world.alice.id, world.bob.id}
    assert thread.payload()["type"] == 12 and thread.payload()["owner_id"] == str(world.alice.id)


# --- which threads are the bot's ---------------------------------------------------------------------------


async def test_in_a_users_thread_the_bot_answers_mentions_only(world: World, start_bot: StartBot) -> None:
    """One mention in someone's thread used to make every later message there a turn, from anyone."""
    emu = world.emu
    async with start_bot() as bot:
        thread = await emu.create_thread(world.general, world.alice, "our own thread")
        await mention(world, thread, world.alice, "first, with a mention")
        await answered(bot, world, thread)
        unaddressed = await emu.send_message(thread, world.bob, "just talking to alice")
        # Turns in one place run in message order, so once this one is answered the one before had its chance.
        await mention(world, thread, world.alice, "second, with a mention")
        users = await user_messages(bot, world, thread, turns=2)
    assert users == ["first, with a mention", "second, with a mention"]
    replied_to = {(m.get("message_reference") or {}).get("message_id") for m in emu.bot_messages_in(thread)}
    assert unaddressed["id"] not in replied_to


async def test_in_a_newchat_thread_every_message_from_anyone_is_a_turn(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await command(world, world.general, world.alice, "newchat", topic="everyone welcome")
        (thread,) = emu.threads_of(world.general)
        assert thread.owner_id == emu.bot_user.id
        await emu.send_message(thread, world.alice, "no mention from alice")
        await answered(bot, world, thread)
        await emu.send_message(thread, world.bob, "no mention from bob")
        users = await user_messages(bot, world, thread, turns=2)
    assert users == ["no mention from alice", "no mention from bob"]


async def test_newchat_in_a_users_thread_says_to_mention_the_bot(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot():
        thread = await emu.create_thread(world.general, world.alice, "alice's thread")
        handle = await command(world, thread, world.alice, "newchat", topic="fresh")
    assert "mention me" in said(handle) and "no mention needed" not in said(handle)


async def test_a_newchat_thread_whose_session_file_broke_still_answers(world: World, start_bot: StartBot) -> None:
    """The broken file is set aside at start-up and the index forgets the session; the thread is still the bot's
    (Discord says the bot owns it), so the next message, without a mention, is answered in a new session."""
    emu = world.emu
    async with start_bot() as bot:
        await command(world, world.general, world.alice, "newchat", topic="fragile")
        (thread,) = emu.threads_of(world.general)
        await emu.send_message(thread, world.alice, "remember this")
        broken = await answered(bot, world, thread)
    (world.data_dir / "sessions" / f"{broken.id}.json").write_text("{ this is not a session", encoding="utf-8")

    async with start_bot() as bot:
        asked = await emu.send_message(thread, world.alice, "still there?")
        fresh: Session = await answered(bot, world, thread)
        reply: dict[str, Any] = await emu.wait_for_message(
            thread, check=lambda m: (m.get("message_reference") or {}).get("message_id") == asked["id"], timeout=60
        )
        told = [m["content"] for m in emu.bot_messages_in(thread) if int(m["id"]) > int(asked["id"])]
    assert fresh.id != broken.id
    assert [(m.role, m.content) for m in fresh.messages if m.role == "user"] == [("user", "still there?")]
    # The thread is told, once, that its earlier history could not be read.
    assert told.count(HISTORY_LOST) == 1
    assert reply["content"]
    assert list((world.data_dir / "quarantine").glob(f"{broken.id}.json.*"))
