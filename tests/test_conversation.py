"""Conversations the way Discord servers talk (issue 11), end to end: the real bot against the Discord API
emulator, with the real engine on tiny LLaMA models, and the prompts checked by their exact token IDs."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from discord_harness import BotProcess, StartBot, World, bot_config, channel_place, finished_session, mention

from bot.admission import UserBusyError
from bot.attachments import TextFile, with_files
from bot.render import Exchange, Speaker
from bot.reply_stream import STREAMING_MARK
from cogs.recovery import INTERRUPTED
from discord_emulator import UploadedFile


async def test_a_shared_channel_session_tells_its_speakers_apart(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "I like tea.")
        await finished_session(bot, channel_place(world, world.general))
        await emu.wait_for_message(world.general, after=asked)
        asked = await mention(world, world.general, world.bob, "I like coffee.")
        session = await finished_session(bot, channel_place(world, world.general), turns=2)
        await emu.wait_for_message(world.general, after=asked)
        renderer = bot.core.renderer
        prompt = renderer.render(session, "Who likes tea?", Speaker(world.alice.id, "Alice"))
    # Discord's display name (global_name) goes with each turn; the prompt names both speakers.
    users = [m for m in session.messages if m.role == "user"]
    assert [(m.author_id, m.author_name) for m in users] == [(world.alice.id, "Alice"), (world.bob.id, "Bob")]
    answers = [m.content for m in session.messages if m.role == "assistant"]
    assert renderer.format is not None
    expected = renderer.format.encode(
        bot.settings.chat.system_prompt or None,
        [Exchange("Alice: I like tea.", answers[0]), Exchange("Bob: I like coffee.", answers[1])],
        "Alice: Who likes tea?",
    )
    assert list(prompt.prompt.ids) == expected  # type: ignore[union-attr]


def stored_sessions(data_dir: Path) -> list[dict[str, Any]]:
    sessions = []
    for path in sorted((data_dir / "sessions").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):  # a file replaced as we read it is read next time
            sessions.append(json.loads(path.read_text()))
    return sessions


def user_messages(data_dir: Path) -> list[dict[str, Any]]:
    return [m for s in stored_sessions(data_dir) for m in s["messages"] if m["role"] == "user"]


@pytest.mark.crash
async def test_an_answer_cut_off_by_a_crash_is_closed_once_at_the_next_start(
    world: World, code_model_dir: Path, tmp_path: Path
) -> None:
    emu = world.emu
    # A long answer, so the bot is surely still writing it when it is killed.
    config = bot_config(tmp_path / "config.toml", emu, code_model_dir, world.data_dir, model={"max_new_tokens": 3000})
    async with await BotProcess.start(config, token=emu.token) as first:
        await emu.wait_ready(timeout=120)
        asked = await mention(world, world.general, world.alice, "write a lot")
        reply = await emu.wait_for_message(world.general, after=asked, timeout=60)
        # History marks the turn pending as soon as its answer shows in Discord.
        await emu.wait_for(
            lambda: any(m["status"] == "pending" for m in user_messages(world.data_dir)), 60, "the pending mark"
        )
        first.kill()
        await first.wait()
    assert emu.message(world.general, reply["id"])["content"].endswith(STREAMING_MARK)

    async with await BotProcess.start(config, token=emu.token) as second:
        await emu.wait_ready(timeout=120)
        edited = await emu.wait_for(
            lambda: INTERRUPTED in (m := emu.message(world.general, reply["id"]))["content"] and m, 60, "the note"
        )
        await emu.wait_for(lambda: user_messages(world.data_dir)[0]["status"] == "interrupted", 30, "the mark")
        second.send_signal(signal.SIGINT)
        await second.wait()
    assert not edited["content"].rstrip("*").endswith(STREAMING_MARK.strip())
    assert STREAMING_MARK not in edited["content"]
    (user,) = user_messages(world.data_dir)
    assert user["answer_message_id"] == int(reply["id"]) and user["discord_message_id"] == int(asked["id"])
    assert " ERROR " not in second.log and "Traceback" not in second.log, second.log
    # Once: a third start finds nothing left to close.
    edits = len(emu.calls("PATCH", rf"/channels/{world.general.id}/messages/{reply['id']}"))
    async with await BotProcess.start(config, token=emu.token) as third:
        await emu.wait_ready(timeout=120)
        await third.wait_for_line("logged in as", timeout=120)
        third.send_signal(signal.SIGINT)
        await third.wait()
    assert len(emu.calls("PATCH", rf"/channels/{world.general.id}/messages/{reply['id']}")) == edits


# --- replies ----------------------------------------------------------------------------------------------


async def answered(world: World, bot: Any, channel: Any, asked: dict[str, Any], turns: int) -> dict[str, Any]:
    """The bot's final reply to `asked`, once its turn is stored."""
    await finished_session(bot, channel_place(world, channel), turns=turns)
    return await world.emu.wait_for(
        lambda: next(
            (
                m
                for m in world.emu.bot_messages_in(channel)
                if m.get("message_reference", {}).get("message_id") == asked["id"]
                and not m["content"].endswith(STREAMING_MARK)
            ),
            None,
        ),
        30,
        "the final answer",
    )


async def test_replying_to_an_answer_is_a_turn_in_that_answers_session(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "first question")
        first_answer = await answered(world, bot, world.general, asked, 1)
        older = await bot.core.store.current(channel_place(world, world.general))
        reset = await emu.invoke_command(world.general, world.alice, "reset", {})
        await emu.wait_for_response(reset)
        # A reply, no mention, to the answer of the session /reset left behind: a turn in that session.
        follow_up = await emu.send_message(world.general, world.bob, "and a follow-up", reply_to=first_answer)
        await emu.wait_for_message(world.general, after=follow_up, timeout=30)
        assert older is not None
        later = await emu.wait_for(
            lambda: (s := bot_store_sessions(bot)) and s.get(older.id, 0) == 2 and s, 30, "the reply's turn"
        )
        current = await bot.core.store.current(channel_place(world, world.general))
    assert current is not None and current.id != older.id and current.turns == 0
    assert later[older.id] == 2
    assert "started this conversation afresh" in reset.response_data["content"]
    assert older.id in reset.response_data["content"]


def bot_store_sessions(bot: Any) -> dict[str, int]:
    return {s.id: s.turns for s in bot.core.store.list_sessions()}


async def test_a_reply_to_someone_else_with_a_mention_quotes_their_message(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        said = await emu.send_message(world.general, world.bob, "The meeting is at 3pm in room 4.")
        asked = await emu.send_message(world.general, world.alice, f"{emu.bot_user.mention} when is it?", reply_to=said)
        session = await finished_session(bot, channel_place(world, world.general))
        await emu.wait_for_message(world.general, after=asked, timeout=30)
    assert session.messages[0].content == '[Replying to Bob: "The meeting is at 3pm in room 4."]\nwhen is it?'


# --- files ------------------------------------------------------------------------------------------------


async def test_text_files_are_read_into_the_turn_and_others_get_a_sentence(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    uploads = [
        UploadedFile("files[0]", "notes.md", "text/markdown", b"# Plan\nShip it on Friday.\n"),
        UploadedFile("files[1]", "main.py", None, b"print('hi')\n"),  # no content type: known by its suffix
        UploadedFile("files[2]", "photo.png", "image/png", b"\x89PNG\r\n\x1a\n\x00"),
        UploadedFile("files[3]", "latin1.txt", "text/plain", "caf\xe9".encode("latin-1")),
    ]
    async with start_bot() as bot:
        message = emu.store.create_message(
            world.general, world.alice, {"content": f"{emu.bot_user.mention} summarise these"}, files=uploads
        )
        await emu.gateway.dispatch_message("MESSAGE_CREATE", message)
        session = await finished_session(bot, channel_place(world, world.general))
        replies = [m["content"] for m in emu.bot_messages_in(world.general)]
        prompt = bot.core.renderer.render(session, "next", Speaker(world.alice.id, "Alice"))
    expected = with_files(
        "summarise these", (TextFile("notes.md", "# Plan\nShip it on Friday.\n"), TextFile("main.py", "print('hi')\n"))
    )
    assert session.messages[0].content == expected
    assert "--- file: notes.md ---\n# Plan\nShip it on Friday.\n--- end of notes.md ---" in expected
    note = replies[0]
    assert "`photo.png`: it is not a text file" in note and "`latin1.txt`: it is not UTF-8 text" in note
    # What the model saw next turn holds the file's text, by token IDs.
    tokenizer = bot.core.engine.tokenizer
    assert "Ship it on Friday." in tokenizer.decode(list(prompt.prompt.ids))  # type: ignore[union-attr]


async def test_a_file_over_the_limit_is_named_and_the_text_still_answered(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    big = UploadedFile("files[0]", "big.txt", "text/plain", b"x" * 2000)
    async with start_bot(chat={"max_attachment_bytes": 1000}) as bot:
        message = emu.store.create_message(
            world.general, world.alice, {"content": f"{emu.bot_user.mention} hello"}, files=[big]
        )
        await emu.gateway.dispatch_message("MESSAGE_CREATE", message)
        session = await finished_session(bot, channel_place(world, world.general))
        first = await emu.wait_for_message(world.general, after=message, timeout=30)
    assert first["content"] == "I did not read `big.txt`: it is 2,000 bytes; the limit is 1,000."
    assert session.messages[0].content == "hello" and session.messages[1].role == "assistant"


# --- /help ------------------------------------------------------------------------------------------------


async def test_help_is_ephemeral_and_says_how_to_talk_here(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot():
        handle = await emu.invoke_command(world.general, world.alice, "help", {})
        await emu.wait_for_response(handle)
    assert handle.ephemeral
    text = handle.response_data["content"]
    assert "Mention me" in text and "/reset" in text and "/newchat" in text


# --- Stop and Regenerate ----------------------------------------------------------------------------------


def button_ids(message: dict[str, Any]) -> dict[str, bool]:
    """custom_id -> disabled, for the buttons on a message as Discord holds it."""
    return {
        button["custom_id"]: bool(button.get("disabled"))
        for row in message.get("components") or []
        for button in row.get("components", [])
    }


async def test_stop_keeps_the_partial_answer_marked_stopped(
    world: World, start_bot: StartBot, code_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=code_model_dir, model={"max_new_tokens": 3000}) as bot:
        asked = await mention(world, world.general, world.alice, "write forever")
        stop_id = f"answer:stop:{asked['id']}"
        reply = await emu.wait_for_message(
            world.general, after=asked, check=lambda m: stop_id in button_ids(m), timeout=60
        )
        refused = await emu.click_button(reply, world.bob, stop_id)
        await emu.wait_for_response(refused)
        stopped = await emu.click_button(reply, world.alice, stop_id)
        await emu.wait_for_response(stopped)
        session = await finished_session(bot, channel_place(world, world.general))
        final = await emu.wait_for(
            lambda: (m := emu.message(world.general, reply["id"]))["content"].endswith("*Stopped by Alice.*") and m,
            30,
            "the stopped answer",
        )
    assert refused.ephemeral and "Only the person who asked" in refused.response_data["content"]
    user, answer = session.messages
    assert (user.status, answer.status) == ("ok", "stopped")
    assert answer.content and final["content"].startswith(answer.content)
    assert answer.discord_message_id == int(reply["id"]) == user.answer_message_id
    # The stopped answer is part of the conversation, and now offers Regenerate instead of Stop.
    assert session.answered_turns() == [(user, answer)]
    assert button_ids(final) == {f"answer:regenerate:{session.id}:{asked['id']}": False}


async def test_regenerate_rewrites_the_latest_answer_even_after_a_restart(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "tell me something")
        first = await answered(world, bot, world.general, asked, 1)
        before = await finished_session(bot, channel_place(world, world.general))
    regenerate_id = f"answer:regenerate:{before.id}:{asked['id']}"
    # The answer ran to max_new_tokens, so it may also go on (tests/test_continue.py).
    assert button_ids(first) == {regenerate_id: False, f"answer:continue:{before.id}:{asked['id']}": False}

    async with start_bot() as bot:  # a restarted bot still knows the button (its custom id says it all)
        handle = await emu.click_button(first, world.alice, regenerate_id)
        await emu.wait_for(lambda: handle.followups(), 60, "the temperature-0 note")
        after = await finished_session(bot, channel_place(world, world.general))
        requests = bot.core.engine.stats.requests
        message = emu.message(world.general, first["id"])
    assert handle.response_type == 6  # the click is acknowledged; the answer is edited in place
    assert requests == 1
    assert len(after.messages) == 2 and after.messages[0] == before.messages[0]
    # Temperature 0: the same answer again, and the user is told why.
    assert after.messages[1].content == before.messages[1].content == message["content"]
    assert "temperature 0" in handle.followups()[0]["content"]


async def test_a_message_sent_as_a_regenerated_answer_shows_final_is_a_turn(world: World, start_bot: StartBot) -> None:
    """The asker's slot is freed before the new answer shows as final, so what they send on seeing it is answered,
    not refused as a second message while the first is being answered: even while Discord is slow to confirm
    that final edit (its response is held here until alice's next message is being answered)."""
    emu = world.emu
    async with start_bot(model={"temperature": 1.0}) as bot:
        asked = await mention(world, world.general, world.alice, "one")
        first = await answered(world, bot, world.general, asked, 1)
        session = await finished_session(bot, channel_place(world, world.general))
        regenerate_id = f"answer:regenerate:{session.id}:{asked['id']}"
        edits = rf"/channels/{world.general.id}/messages/{first['id']}"
        # While it streams the answer has Stop; its final edit brings Regenerate back.
        final_edit = emu.slow_responses(edits, method="PATCH", when=lambda call: regenerate_id in json.dumps(call.json))
        typing = rf"/channels/{world.general.id}/typing"
        async with final_edit as held:
            await emu.click_button(first, world.alice, regenerate_id)
            await emu.wait_for(lambda: held.hits, 60, "the regenerated answer's final edit")
            typed = len(emu.calls("POST", typing))
            later = await mention(world, world.general, world.alice, "two")
            # The bot types when a turn begins, never for a refusal. (Its answer's edits wait behind the held one:
            # discord.py sends one request at a time per route and channel until Discord tells it the limits.)
            await emu.wait_for(lambda: len(emu.calls("POST", typing)) > typed, 60, "the bot to begin answering")
        reply = await emu.wait_for_message(
            world.general,
            check=lambda m: (
                (m.get("message_reference") or {}).get("message_id") == later["id"]
                and not m["content"].endswith(STREAMING_MARK)
            ),
            timeout=60,
        )
        session = await finished_session(bot, channel_place(world, world.general), turns=2)
    assert reply["content"] != UserBusyError.user_message
    assert [m.content for m in session.messages if m.role == "user"] == ["one", "two"]


async def test_a_regenerate_click_discord_refuses_frees_the_slot_without_a_traceback(
    world: World, start_bot: StartBot
) -> None:
    """Discord refuses the click's acknowledgement: nothing starts, one warning (an ERROR would fail the test),
    and alice may go on talking there."""
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "one")
        first = await answered(world, bot, world.general, asked, 1)
        session = await finished_session(bot, channel_place(world, world.general))
        refused = emu.fail_next(r"/interactions/\d+/[^/]+/callback", method="POST", status=400)
        await emu.click_button(first, world.alice, f"answer:regenerate:{session.id}:{asked['id']}")
        await emu.wait_for(lambda: refused.hits, 60, "the refused acknowledgement")
        # The slot was taken before the acknowledgement: this waits until it is free again.
        unchanged = await finished_session(bot, channel_place(world, world.general))
        later = await mention(world, world.general, world.alice, "two")
        reply = await answered(world, bot, world.general, later, 2)
    assert unchanged.messages == session.messages
    assert reply["content"] != UserBusyError.user_message


async def test_regenerate_on_an_older_answer_turns_itself_off(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(model={"temperature": 1.0}) as bot:
        asked = await mention(world, world.general, world.alice, "one")
        first = await answered(world, bot, world.general, asked, 1)
        later = await mention(world, world.general, world.alice, "two")
        await answered(world, bot, world.general, later, 2)
        session = await finished_session(bot, channel_place(world, world.general), turns=2)
        regenerate_id = f"answer:regenerate:{session.id}:{asked['id']}"
        handle = await emu.click_button(emu.message(world.general, first["id"]), world.alice, regenerate_id)
        await emu.wait_for(lambda: handle.followups(), 30, "the sentence")
        unchanged = await bot.core.store.get(session.id)
    assert button_ids(emu.message(world.general, first["id"]))[regenerate_id] is True
    assert handle.followups()[0]["content"] == "Only the latest answer of a conversation can be regenerated."
    assert unchanged is not None and unchanged.messages == session.messages


async def test_continue_here_makes_a_looked_up_session_this_places_conversation(
    world: World, start_bot: StartBot
) -> None:
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "remember the number 42")
        await answered(world, bot, world.general, asked, 1)
        original = await finished_session(bot, channel_place(world, world.general))
        shown = await emu.invoke_command(world.random, world.alice, "history", {"session": original.id})
        await emu.wait_for_response(shown)
        button = f"session:continue:{original.id}"
        assert button in button_ids(shown.original())
        clicked = await emu.click_button(shown.original(), world.alice, button)
        await emu.wait_for_response(clicked)
        here = await bot.core.store.current(channel_place(world, world.random))
        asked = await mention(world, world.random, world.alice, "which number?")
        after = await finished_session(bot, channel_place(world, world.random), turns=2)
        still = await bot.core.store.get(original.id)
    assert here is not None and here.id != original.id and here.messages == original.messages
    assert after.id == here.id and after.exchanges()[0] == original.exchanges()[0]
    assert still is not None and still.messages == original.messages  # the original stays where it was
    assert "continued" in clicked.response_data["content"]


async def test_a_channels_persona_starts_its_new_sessions_with_variables_filled(
    world: World, start_bot: StartBot
) -> None:
    emu = world.emu
    managers = emu.add_role(world.guild, "managers", 1 << 5)  # Manage Server
    carol = emu.add_user("carol")
    emu.add_member(world.guild, carol, roles=[managers])
    prompt = "You are {bot}, a pirate in #{channel} of {server}. Keep {braces} as typed."
    async with start_bot() as bot:
        handle = await emu.invoke_command(world.general, carol, "persona set", {"prompt": prompt})
        await emu.wait_for_response(handle)
        asked = await mention(world, world.general, world.alice, "ahoy")
        session = await finished_session(bot, channel_place(world, world.general))
        await emu.wait_for_message(world.general, after=asked, timeout=30)
        elsewhere = await mention(world, world.random, world.alice, "hello")
        other = await finished_session(bot, channel_place(world, world.random))
        await emu.wait_for_message(world.random, after=elsewhere, timeout=30)
    bot_name = emu.bot_user.global_name or emu.bot_user.username
    assert session.system_prompt == (
        f"You are {bot_name}, a pirate in #general of {world.guild.name}. Keep {{braces}} as typed."
    )
    assert other.system_prompt == bot.settings.chat.system_prompt  # #random has no persona
