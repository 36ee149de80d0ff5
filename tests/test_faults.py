"""Faults, end to end against the Discord API emulator: a graceful stop on SIGTERM/SIGINT, a full disk and a
read-only data folder, and Discord going away (gateway drops, 5xx and 429 on sends and edits).

The rule every test checks: a turn the user saw answered in Discord is in history with that answer; a turn that
got no answer is marked and the user is told; nothing stored before the fault is damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from discord_harness import BotProcess, bot_config, bot_settings, running_chat_bot
from script_model import build_script_llama, expected_answer

from bot.client import ChatBot
from bot.errors import StorageError
from bot.sessions import Place, Session, StoredMessage
from cogs.chat import RESTARTING
from discord_emulator import Channel, DiscordEmulator, Guild, User, running_emulator

pytestmark = pytest.mark.faults

# One-letter tokens: 600 of them fit one Discord message (1,199 characters) and take a few seconds to write.
LETTERS = "a b c d e f g h i j k l m n o p"
LONG = 600
RESTARTED = "restarted before I could finish"


@dataclass
class World:
    emu: DiscordEmulator
    guild: Guild
    channels: list[Channel]
    alice: User
    bob: User
    data_dir: Path
    tmp_path: Path

    def place(self, channel: Channel) -> Place:
        return Place(kind="channel", guild_id=self.guild.id, channel_id=channel.id)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_emulator() as emu:
        guild = emu.add_guild("faults")
        alice, bob = emu.add_user("alice"), emu.add_user("bob")
        emu.add_member(guild, alice)
        emu.add_member(guild, bob)
        channels = [emu.add_text_channel(guild, f"room-{n}") for n in range(4)]
        yield World(emu, guild, channels, alice, bob, tmp_path / "data", tmp_path)


@pytest.fixture(scope="module")
def letters_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_script_llama(tmp_path_factory.mktemp("letters-model"), LETTERS)


StartBot = Callable[..., AbstractAsyncContextManager[ChatBot]]


@pytest.fixture
def start_bot(world: World, letters_model_dir: Path) -> StartBot:
    """`async with start_bot(model={...}, discord={...}) as bot:` our ChatBot in this process."""

    def start(**sections: Any) -> AbstractAsyncContextManager[ChatBot]:
        settings = bot_settings(world.emu, letters_model_dir, world.data_dir, **sections)
        return running_chat_bot(world.emu, settings)

    return start


async def mention(world: World, channel: Channel, author: User, text: str) -> dict[str, Any]:
    return await world.emu.send_message(channel, author, f"{world.emu.bot_user.mention} {text}")


def replies_to(emu: DiscordEmulator, channel: Channel, asked: dict[str, Any]) -> list[dict[str, Any]]:
    """The bot's messages that reply to `asked`, as Discord holds them now."""
    return [
        m for m in emu.bot_messages_in(channel) if (m.get("message_reference") or {}).get("message_id") == asked["id"]
    ]


async def reply_saying(
    emu: DiscordEmulator,
    channel: Channel,
    asked: dict[str, Any],
    check: Callable[[str], bool],
    timeout: float = 120,  # noqa: ASYNC109 - generous: a loaded 2-core machine is slow, not wrong
) -> dict[str, Any]:
    """The bot's reply to `asked` once its text passes `check`."""

    def found() -> dict[str, Any] | None:
        return next((m for m in replies_to(emu, channel, asked) if check(m["content"])), None)

    return await emu.wait_for(found, timeout, f"the reply to {asked['content']!r}")


def stored_turn(session: Session | None, asked: dict[str, Any]) -> tuple[StoredMessage, StoredMessage | None]:
    """The user message stored for `asked`, and the answer stored after it (None when it has none)."""
    assert session is not None, f"no session holds {asked['content']!r}"
    for index, message in enumerate(session.messages):
        if message.role == "user" and message.discord_message_id == int(asked["id"]):
            after = session.messages[index + 1] if index + 1 < len(session.messages) else None
            return message, after if after is not None and after.role == "assistant" else None
    raise AssertionError(f"{asked['content']!r} is not in session {session.id}")


def session_on_disk(data_dir: Path, place: Place) -> Session | None:
    """The newest session of `place` as its file holds it. Only reads: a running bot owns the folder."""
    found: list[Session] = []
    for path in (data_dir / "sessions").glob("*.json"):
        session = Session.from_json(json.loads(path.read_bytes()))
        if session.place.key == place.key:
            found.append(session)
    return max(found, key=lambda s: s.created_at, default=None)


async def stored_on_disk(
    world: World,
    channel: Channel,
    *,
    turns: int,
    answered: bool = True,
    timeout: float = 30,  # noqa: ASYNC109
) -> Session:
    """The channel's session on disk once it holds `turns` user messages, the last with its outcome."""

    async def poll() -> Session:
        while True:
            session = session_on_disk(world.data_dir, world.place(channel))
            if session is not None and session.turns >= turns:
                last = session.messages[-1]
                if (last.role == "assistant") if answered else last.status not in ("ok", "pending"):
                    return session
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout)


async def stored_in(bot: ChatBot, place: Place, *, turns: int) -> Session:
    """The place's session, from the running bot's store, once it holds `turns` answered user messages."""

    async def poll() -> Session:
        while True:
            session = await bot.core.store.current(place)
            if session is not None and session.turns >= turns and session.messages[-1].role == "assistant":
                return session
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), 30)


def assert_clean_log(bot: BotProcess) -> None:
    assert not bot.errors(), bot.log


# --- a graceful stop --------------------------------------------------------------------------------------


def long_answer_config(world: World, model_dir: Path, *, shutdown_grace: float) -> Path:
    """A config for a child bot whose answers run LONG tokens, stopping with the given grace."""
    return bot_config(
        world.tmp_path / "config.toml",
        world.emu,
        model_dir,
        world.data_dir,
        model={"max_new_tokens": LONG},
        discord={"shutdown_grace": shutdown_grace},
    )


async def test_sigterm_mid_answer_keeps_acknowledged_turns_and_cancels_the_rest(
    world: World, letters_model_dir: Path
) -> None:
    emu = world.emu
    answered, running = world.channels[:2], world.channels[2]
    final = expected_answer(LETTERS, LONG).strip()
    config = long_answer_config(world, letters_model_dir, shutdown_grace=0)
    async with await BotProcess.start(config, token=emu.token) as bot:
        await emu.wait_ready(timeout=120)
        done = [await mention(world, channel, world.alice, f"tell me in {channel.name}") for channel in answered]
        for channel, asked in zip(answered, done, strict=True):
            await reply_saying(emu, channel, asked, lambda text: text == final, timeout=180)
            # Stored too: the final text shows a moment before the turn is written (see test_crash_safety).
            await stored_on_disk(world, channel, turns=1, timeout=180)
        asked = await mention(world, running, world.bob, "a long one please")
        await reply_saying(emu, running, asked, lambda text: len(text) > 0)
        bot.send_signal(signal.SIGTERM)
        code = await bot.wait()

    assert code == 0, bot.log
    assert_clean_log(bot)
    assert "stopped: history flushed, gateway closed" in bot.log
    for channel, question in zip(answered, done, strict=True):
        user, answer = stored_turn(session_on_disk(world.data_dir, world.place(channel)), question)
        assert user.status == "ok" and answer is not None
        assert answer.content == final == replies_to(emu, channel, question)[0]["content"]
    user, answer = stored_turn(session_on_disk(world.data_dir, world.place(running)), asked)
    assert (user.status, answer) == ("cancelled", None)
    (told,) = replies_to(emu, running, asked)
    assert RESTARTED in told["content"]
    assert emu.gateway.ready_shards() == set(), "the gateway connection is closed"


async def test_sigint_lets_a_running_answer_finish_and_takes_no_new_turns(
    world: World, letters_model_dir: Path
) -> None:
    emu = world.emu
    first, late = world.channels[0], world.channels[1]
    final = expected_answer(LETTERS, LONG).strip()
    # Grace and wait are bounds for a broken bot: the rest of the answer takes seconds, on a busy machine more.
    config = long_answer_config(world, letters_model_dir, shutdown_grace=180)
    async with await BotProcess.start(config, token=emu.token) as bot:
        await emu.wait_ready(timeout=120)
        asked = await mention(world, first, world.alice, "finish this one")
        await reply_saying(emu, first, asked, lambda text: len(text) > 0)
        bot.send_signal(signal.SIGINT)
        await bot.wait_for_line("answers to finish")
        too_late = await mention(world, late, world.bob, "am I too late?")
        code = await bot.wait(timeout=240)

    assert code == 0, bot.log
    assert_clean_log(bot)
    user, answer = stored_turn(session_on_disk(world.data_dir, world.place(first)), asked)
    assert user.status == "ok" and answer is not None
    assert answer.content == final == replies_to(emu, first, asked)[0]["content"]
    # A message that arrives while stopping is not a turn: nothing is half-done for it.
    assert session_on_disk(world.data_dir, world.place(late)) is None
    (told,) = replies_to(emu, late, too_late)
    assert told["content"] == RESTARTING


# --- a full disk, a read-only data folder ------------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """No file of this process may grow past `limit` bytes: writes past it fail with EFBIG, as on a full disk.

    Python ignores SIGXFSZ, so the kernel's answer is an OSError in the writing thread, the same path ENOSPC
    takes. We run as root in CI, where permissions do not stop writes; this limit does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_a_full_disk_is_told_and_nothing_stored_is_damaged(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    room, other = world.channels[0], world.channels[1]
    final = expected_answer(LETTERS, 200).strip()
    async with start_bot(model={"max_new_tokens": 200}) as bot:
        kept = await mention(world, room, world.alice, "remember this")
        await reply_saying(emu, room, kept, lambda text: text == final)
        before = await stored_in(bot, world.place(room), turns=1)
        path = world.data_dir / "sessions" / f"{before.id}.json"
        stored_bytes = path.read_bytes()

        # The next exchange makes this session's file larger than the disk allows.
        with file_size_limit(len(stored_bytes) + 200):
            lost = await mention(world, room, world.alice, "this one cannot be saved")
            told = await reply_saying(emu, room, lost, lambda text: StorageError.user_message in text)
            assert path.read_bytes() == stored_bytes, "the stored session is untouched"
            # The bot keeps serving: a small new session still fits.
            fits = await mention(world, other, world.bob, "short")
            await reply_saying(emu, other, fits, lambda text: text == final)
            await stored_in(bot, world.place(other), turns=1)

        again = await mention(world, room, world.alice, "and now?")
        await reply_saying(emu, room, again, lambda text: text == final)
        after = await stored_in(bot, world.place(room), turns=2)

    assert told["content"].startswith(final), "the answer stays shown, with the sentence under it"
    assert after.messages[:2] == before.messages
    assert [m.discord_message_id for m in after.messages if m.role == "user"] == [int(kept["id"]), int(again["id"])]
    assert not (world.data_dir / "quarantine").exists()
    assert not list((world.data_dir / "sessions").glob(".*.tmp")), "no temp file is left behind"


# prctl(PR_CAPBSET_DROP, cap): the capabilities that let root write where permissions say no.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def _without_root_overrides() -> None:
    """In the child before exec: drop the capabilities by which root ignores file permissions, so that
    `chmod a-w` makes the data folder read-only for the bot as it would for any other user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


async def test_a_read_only_data_folder_is_told_and_the_bot_keeps_serving(world: World, letters_model_dir: Path) -> None:
    emu = world.emu
    room, fresh = world.channels[0], world.channels[1]
    final = expected_answer(LETTERS, 40).strip()
    config = bot_config(
        world.tmp_path / "config.toml", emu, letters_model_dir, world.data_dir, model={"max_new_tokens": 40}
    )
    async with await BotProcess.start(config, token=emu.token, preexec_fn=_without_root_overrides) as bot:
        await emu.wait_ready(timeout=120)
        kept = await mention(world, room, world.alice, "remember this")
        await reply_saying(emu, room, kept, lambda text: text == final)
        before = await stored_on_disk(world, room, turns=1)
        files = {p: p.read_bytes() for p in world.data_dir.rglob("*") if p.is_file()}

        _set_writable(world.data_dir, False)
        try:
            lost = await mention(world, room, world.alice, "this one cannot be saved")
            told = await reply_saying(emu, room, lost, lambda text: StorageError.user_message in text)
            # A new place needs a new session file: refused the same way, before the model is asked.
            refused = await mention(world, fresh, world.bob, "hello?")
            await reply_saying(emu, fresh, refused, lambda text: text == StorageError.user_message)
            assert {p: p.read_bytes() for p in files} == files, "nothing stored changed"
        finally:
            _set_writable(world.data_dir, True)

        again = await mention(world, room, world.alice, "and now?")
        await reply_saying(emu, room, again, lambda text: text == final)
        after = await stored_on_disk(world, room, turns=2)
        bot.send_signal(signal.SIGTERM)
        assert await bot.wait() == 0

    assert told["content"].startswith(final)
    assert after.messages[:2] == before.messages
    assert [m.discord_message_id for m in after.messages if m.role == "user"] == [int(kept["id"]), int(again["id"])]
    assert "Permission denied" in bot.log, "the writes really were refused by the OS"
    assert_clean_log(bot)


# --- Discord goes away and comes back ----------------------------------------------------------------------


async def test_the_bot_resumes_after_the_gateway_drops(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    room = world.channels[0]
    final = expected_answer(LETTERS, 12).strip()
    async with start_bot() as bot:
        first = await mention(world, room, world.alice, "before")
        await reply_saying(emu, room, first, lambda text: text == final)
        await stored_in(bot, world.place(room), turns=1)
        await emu.close_gateway(code=4000)
        await emu.wait_for(lambda: emu.gateway.resume_count >= 1, what="the bot to resume")
        second = await mention(world, room, world.alice, "after")
        await reply_saying(emu, room, second, lambda text: text == final)
        session = await stored_in(bot, world.place(room), turns=2)
    assert emu.gateway.identify_count == 1, "resumed, not re-identified"
    assert [m.content for m in session.messages if m.role == "user"] == ["before", "after"]


async def test_5xx_and_429_on_sends_and_edits_are_retried_and_the_answer_delivered(
    world: World, start_bot: StartBot
) -> None:
    emu = world.emu
    room = world.channels[0]
    final = expected_answer(LETTERS, 300).strip()
    messages = rf"/channels/{room.id}/messages"
    async with start_bot(model={"max_new_tokens": 300}, discord={"stream_edit_interval": 0.02}) as bot:
        send_500 = emu.fail_next(messages, method="POST", status=500)
        send_429 = emu.fail_next(messages, method="POST", status=429, retry_after=0.2)
        edit_502 = emu.fail_next(messages + r"/\d+", method="PATCH", status=502)
        edit_429 = emu.fail_next(messages + r"/\d+", method="PATCH", status=429, retry_after=0.2, times=2)
        asked = await mention(world, room, world.alice, "through the storm")
        reply = await reply_saying(emu, room, asked, lambda text: text == final, timeout=60)
        session = await stored_in(bot, world.place(room), turns=1)
    for rule, times in ((send_500, 1), (send_429, 1), (edit_502, 1), (edit_429, 2)):
        assert len(rule.hits) == times and rule.times == 0, rule
    assert len(replies_to(emu, room, asked)) == 1, "a retried send makes one message, not two"
    assert session.messages[-1].content == reply["content"]
    assert session.messages[0].status == "ok"


async def test_an_answer_written_while_the_gateway_is_down_is_delivered(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    room, other = world.channels[0], world.channels[1]
    final = expected_answer(LETTERS, LONG).strip()
    short = expected_answer(LETTERS, 12).strip()
    async with start_bot(model={"max_new_tokens": LONG}) as bot:
        asked = await mention(world, room, world.alice, "a long one")
        await reply_saying(emu, room, asked, lambda text: len(text) > 0)
        async with emu.gateway_outage():
            # REST still works: the answer that was being written reaches Discord during the outage.
            await reply_saying(emu, room, asked, lambda text: text == final, timeout=180)
            missed = await mention(world, other, world.bob, "anyone?")
            await asyncio.sleep(0.2)
            assert replies_to(emu, other, missed) == [], "no gateway, no event"
        # Back: the bot resumes and Discord replays the message it missed.
        await emu.wait_for(lambda: emu.gateway.resume_count >= 1, what="the bot to resume")
        await reply_saying(emu, other, missed, lambda text: text.startswith(short[:20]), timeout=60)
        done = await stored_in(bot, world.place(room), turns=1)
        late = await stored_in(bot, world.place(other), turns=1)
    assert done.messages[-1].content == final
    assert late.messages[0].discord_message_id == int(missed["id"])


async def test_discord_refusing_an_edit_is_told_and_marked(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    room = world.channels[0]
    async with start_bot(model={"max_new_tokens": LONG}, discord={"stream_edit_interval": 0.02}) as bot:
        # 503 is not among the statuses discord.py retries: the edit fails at once.
        emu.fail_next(rf"/channels/{room.id}/messages/\d+", method="PATCH", status=503)
        asked = await mention(world, room, world.alice, "hello")
        told = await reply_saying(emu, room, asked, lambda text: "Discord refused a message" in text)
        session = await bot.core.store.current(world.place(room))
        assert session is not None
    assert len(replies_to(emu, room, asked)) == 1
    assert told["content"].endswith("*")
    assert [(m.role, m.status) for m in session.messages] == [("user", "failed")]
