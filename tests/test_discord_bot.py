"""The bot end to end: the real discord.py client (our ChatBot and cogs) against the Discord API emulator,
with the real engine on tiny LLaMA models. Each test is one behaviour a Discord user sees."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
from pathlib import Path
from typing import Any

from discord_harness import BotProcess, StartBot, World, channel_place, finished_session, mention, thread_place
from script_model import CODE_SCRIPT, expected_answer

from bot.history import HistoryStore
from bot.reply_stream import STREAMING_MARK
from bot.sessions import Place
from discord_emulator import Channel, User


def without_fences(text: str) -> str:
    return re.sub(r"```(python)?", "", "".join(text.split()))


# --- mentions in channels -------------------------------------------------------------------------------


async def test_a_mention_gets_a_reply_in_the_channel(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        asked = await mention(world, world.general, world.alice, "hello there")
        session = await finished_session(bot, channel_place(world, world.general))
        reply = await emu.wait_for_message(world.general, after=asked)

    assert reply["message_reference"]["message_id"] == asked["id"]
    first_post = emu.calls("POST", rf"/channels/{world.general.id}/messages")[0]
    assert first_post.json["message_reference"]["message_id"] == int(asked["id"])
    assert first_post.json["allowed_mentions"] == {"parse": []}
    assert emu.calls("POST", rf"/channels/{world.general.id}/typing")
    # The mention addresses the bot; it is not part of what the model reads.
    assert session.messages[0].content == "hello there"
    assert session.messages[0].author_id == world.alice.id
    assert session.messages[0].discord_message_id == int(asked["id"])
    assert emu.message(world.general, reply["id"])["content"] == session.messages[1].content


async def test_messages_that_do_not_mention_the_bot_are_not_turns(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await emu.send_message(world.general, world.alice, "just chatting with bob")
        await emu.send_message(world.general, world.bob, f"{world.alice.mention} indeed")
        await mention(world, world.general, world.alice, "now you")
        session = await finished_session(bot, channel_place(world, world.general))
    assert [m.content for m in session.messages if m.role == "user"] == ["now you"]
    assert len(emu.bot_messages_in(world.general)) == 1


async def test_the_answer_streams_through_edits_and_history_keeps_the_final_text(
    world: World, start_bot: StartBot, code_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(
        model_dir=code_model_dir, model={"max_new_tokens": 300}, discord={"stream_edit_interval": 0.01}
    ) as bot:
        asked = await mention(world, world.general, world.alice, "show me code")
        session = await finished_session(bot, channel_place(world, world.general))
    (reply,) = emu.bot_messages_in(world.general)
    edits = emu.calls("PATCH", rf"/channels/{world.general.id}/messages/{reply['id']}")
    assert edits, "a streamed answer is edited as it grows"
    assert all(e.json["allowed_mentions"] == {"parse": []} for e in edits)
    shown = [emu.calls("POST", rf"/channels/{world.general.id}/messages")[0].json["content"]]
    shown += [e.json["content"] for e in edits]
    # While it is written the text ends with the streaming mark; the last edit, once stored, is the answer.
    assert all(text.endswith(STREAMING_MARK) for text in shown[:-1])
    shown = [text.removesuffix(STREAMING_MARK) for text in shown]
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(shown))
    final = expected_answer(CODE_SCRIPT, 300).strip()
    assert session.messages[-1].content == final
    assert reply["content"] == final
    assert reply["message_reference"]["message_id"] == asked["id"]


async def test_an_answer_over_4000_characters_is_split_with_fences_balanced(
    world: World, start_bot: StartBot, code_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=code_model_dir, model={"max_new_tokens": 1400}) as bot:
        await mention(world, world.general, world.alice, "a lot of code please")
        session = await finished_session(bot, channel_place(world, world.general), timeout=120)
    answer = expected_answer(CODE_SCRIPT, 1400).strip()
    assert len(answer) > 4000
    assert session.messages[-1].content == answer
    posted = emu.bot_messages_in(world.general)
    assert len(posted) >= 3
    for message in posted:
        assert 0 < len(message["content"]) <= 2000
    for message in posted[:-1]:
        assert message["content"].count("```") % 2 == 0, "every split message has its code blocks closed"
    # The last one is as balanced as the answer itself (this answer stops inside a code block).
    assert posted[-1]["content"].count("```") % 2 == answer.count("```") % 2
    assert posted[0]["message_reference"]["message_id"]
    assert without_fences("".join(m["content"] for m in posted)) == without_fences(answer)


async def test_model_output_never_pings(world: World, start_bot: StartBot, ping_model_dir: Path) -> None:
    emu = world.emu
    async with start_bot(model_dir=ping_model_dir, model={"max_new_tokens": 60}) as bot:
        await mention(world, world.general, world.alice, "say something loud")
        session = await finished_session(bot, channel_place(world, world.general))
    assert "@everyone" in session.messages[-1].content and "<@&1234567890>" in session.messages[-1].content
    bodies = [c.json for c in emu.calls(None, rf"/channels/{world.general.id}/messages(/\d+)?") if c.json]
    assert bodies
    for body in bodies:
        assert body["allowed_mentions"] == {"parse": []}, body
    for message in emu.bot_messages_in(world.general):
        assert message["mentions"] == [] and not message["mention_everyone"] and message["mention_roles"] == []


async def test_a_message_over_the_limit_gets_one_clear_sentence(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(chat={"max_message_chars": 50}) as bot:
        asked = await mention(world, world.general, world.alice, "x" * 60)
        reply = await emu.wait_for_message(world.general, after=asked)
        session = await finished_session(bot, channel_place(world, world.general))
    assert reply["content"] == "Your message is 60 characters; the limit is 50. Please shorten it."
    assert [(m.role, m.status) for m in session.messages] == [("user", "failed")]
    assert bot.core.engine.stats.requests == 0


async def test_a_discord_error_while_answering_is_told_and_marked(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        emu.fail_next(rf"/channels/{world.general.id}/messages", method="POST", status=403)
        asked = await mention(world, world.general, world.alice, "hello")
        session = await finished_session(bot, channel_place(world, world.general))
        told = await emu.wait_for_message(world.general, after=asked)
    assert "Discord refused a message" in told["content"]
    assert [(m.role, m.status) for m in session.messages] == [("user", "failed")]


async def test_deleting_the_question_cancels_its_answer(
    world: World, start_bot: StartBot, code_model_dir: Path
) -> None:
    emu = world.emu
    async with start_bot(model_dir=code_model_dir, model={"max_new_tokens": 3000}) as bot:
        asked = await mention(world, world.general, world.alice, "write forever")
        await emu.wait_for_message(world.general, after=asked, timeout=60)
        await emu.delete_message(asked)
        session = await finished_session(bot, channel_place(world, world.general))
        assert [(m.role, m.status) for m in session.messages] == [("user", "cancelled")]
        await asyncio.sleep(0.3)
        assert bot.core.engine.running == 0


async def test_a_queue_note_is_replaced_by_the_answer(world: World, start_bot: StartBot, code_model_dir: Path) -> None:
    emu = world.emu
    third = emu.add_text_channel(world.guild, "third")
    async with start_bot(model_dir=code_model_dir, model={"max_new_tokens": 400, "max_batch_size": 1}) as bot:
        engine = bot.core.engine
        await mention(world, world.general, world.alice, "first")
        await emu.wait_for(lambda: engine.running >= 1, 60, "the first request to run")
        await mention(world, world.random, world.bob, "second")
        await emu.wait_for(lambda: engine.waiting >= 1, what="the second request to wait")
        asked = await mention(world, third, world.alice, "third")
        note = await emu.wait_for_message(third, after=asked)
        session = await finished_session(bot, channel_place(world, third), timeout=180)
    first_post = emu.calls("POST", rf"/channels/{third.id}/messages")[0]
    assert first_post.json["content"] == "*queued: 1 ahead*"
    assert first_post.json["message_reference"]["message_id"] == int(asked["id"])
    assert emu.message(third, note["id"])["content"] == session.messages[-1].content


async def test_stopping_the_bot_mid_answer_tells_the_user_and_marks_the_turn(
    world: World, start_bot: StartBot, code_model_dir: Path
) -> None:
    emu = world.emu
    settings = {"model": {"max_new_tokens": 3000}, "discord": {"shutdown_grace": 0.2}}
    async with start_bot(model_dir=code_model_dir, **settings):
        asked = await mention(world, world.general, world.alice, "write forever")
        await emu.wait_for_message(world.general, after=asked, timeout=60)
    (reply,) = emu.bot_messages_in(world.general)
    assert "restarted before I could finish" in reply["content"]
    async with HistoryStore(world.data_dir) as store:
        session = await store.current(channel_place(world, world.general))
    assert session is not None
    assert [(m.role, m.status) for m in session.messages] == [("user", "cancelled")]


# --- /newchat and threads --------------------------------------------------------------------------------


async def new_chat(world: World, channel: Channel, user: User, **options: str) -> Any:
    handle = await world.emu.invoke_command(channel, user, "newchat", options)
    await world.emu.wait_for(lambda: handle.original() is not None and not handle.is_loading(), what="/newchat")
    return handle


async def test_newchat_opens_a_thread_where_every_message_is_a_turn(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        assert emu.calls("PUT", rf"/applications/\d+/guilds/{world.guild.id}/commands")
        handle = await new_chat(world, world.general, world.alice, topic="Rust questions")
        (thread,) = emu.threads_of(world.general)
        assert thread.name == "Rust questions"
        assert emu.calls("POST", rf"/channels/{world.general.id}/threads")
        assert f"<#{thread.id}>" in handle.original()["content"]

        asked = await emu.send_message(thread, world.alice, "what is ownership?")
        session = await finished_session(bot, thread_place(world, thread))
        reply = await emu.wait_for_message(thread, after=asked)
    assert session.title == "Rust questions"
    assert session.owner_id == world.alice.id
    assert session.messages[0].content == "what is ownership?"
    assert reply["message_reference"]["message_id"] == asked["id"]


async def test_newchat_names_the_thread_after_the_user_and_sets_a_system_prompt(
    world: World, start_bot: StartBot
) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await new_chat(world, world.general, world.bob, system_prompt="Answer like a pirate.")
        (thread,) = emu.threads_of(world.general)
        session = await bot.core.store.current(thread_place(world, thread))
    assert thread.name == "Chat with Bob"  # the display name
    assert session is not None and session.system_prompt == "Answer like a pirate."


async def test_newchat_in_a_thread_starts_afresh_and_keeps_the_old_session(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await new_chat(world, world.general, world.alice, topic="first topic")
        (thread,) = emu.threads_of(world.general)
        place = thread_place(world, thread)
        await emu.send_message(thread, world.alice, "one")
        old = await finished_session(bot, place)
        handle = await emu.invoke_command(thread, world.alice, "newchat", {"topic": "second topic"})
        await emu.wait_for_response(handle)
        await emu.send_message(thread, world.alice, "two")
        new = await finished_session(bot, place)
        listing = await emu.invoke_command(world.general, world.alice, "history", {})
        await emu.wait_for_response(listing)
    assert new.id != old.id
    assert [m.content for m in new.messages if m.role == "user"] == ["two"]
    assert len(emu.threads_of(world.general)) == 1, "in a thread, /newchat starts afresh in place"
    assert old.id in listing.response_data["content"] and new.id in listing.response_data["content"]


async def test_two_users_writing_at_once_in_a_thread_both_land_in_order(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await new_chat(world, world.general, world.alice, topic="busy thread")
        (thread,) = emu.threads_of(world.general)
        await asyncio.gather(
            emu.send_message(thread, world.alice, "from alice"),
            emu.send_message(thread, world.bob, "from bob"),
        )
        session = await finished_session(bot, thread_place(world, thread), turns=2)
    users = [(m.content, m.author_id) for m in session.messages if m.role == "user"]
    assert users == [("from alice", world.alice.id), ("from bob", world.bob.id)]
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert len(emu.bot_messages_in(thread)) == 3  # the welcome note and two answers


async def test_a_restarted_bot_continues_the_thread_with_its_history(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as first_bot:
        await new_chat(world, world.general, world.alice, topic="long story")
        (thread,) = emu.threads_of(world.general)
        await emu.send_message(thread, world.alice, "chapter one")
        before = await finished_session(first_bot, thread_place(world, thread))

    async with start_bot() as second_bot:
        asked = await emu.send_message(thread, world.alice, "chapter two")
        after = await finished_session(second_bot, thread_place(world, thread), turns=2)
        await emu.wait_for_message(thread, after=asked)
        prompt = list(second_bot.core.renderer.render(before, "chapter two").prompt.ids)
    assert after.id == before.id
    assert after.exchanges()[0] == before.exchanges()[0]
    assert [u for u, _ in after.exchanges()] == ["chapter one", "chapter two"]
    # The second turn's prompt holds the first exchange, in LLaMA-2's format.
    text = second_bot.core.engine.tokenizer.decode(prompt)
    assert "chapter one" in text and text.count("[INST]") == 2


# --- DMs --------------------------------------------------------------------------------------------------


async def test_every_dm_is_a_turn(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot() as bot:
        await emu.send_dm(world.alice, "hi in private")
        session = await finished_session(bot, Place(kind="dm", user_id=world.alice.id))
    dm = emu.dm_channel(world.alice)
    (reply,) = emu.bot_messages_in(dm)
    assert session.messages[0].content == "hi in private"
    assert reply["content"] == session.messages[-1].content


async def test_dms_can_be_turned_off(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(discord={"allow_dms": False}) as bot:
        await emu.send_dm(world.alice, "anyone there?")
        await mention(world, world.general, world.alice, "and here?")
        await finished_session(bot, channel_place(world, world.general))
        assert await bot.core.store.current(Place(kind="dm", user_id=world.alice.id)) is None
    assert emu.bot_messages_in(emu.dm_channel(world.alice)) == []


# --- /history ---------------------------------------------------------------------------------------------


async def test_history_pages_through_many_sessions(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(chat={"newchat_per_minute": 0}):  # twelve threads in a row: no per-user limit here
        for number in range(12):
            await new_chat(world, world.general, world.alice, topic=f"topic {number:02d}")
        listing = await emu.invoke_command(world.general, world.alice, "history", {})
        await emu.wait_for_response(listing)
        assert listing.ephemeral
        first_page = listing.response_data["content"]
        assert "page 1 of 2" in first_page
        assert "topic 11" in first_page and "topic 00" not in first_page, "newest first"
        assert first_page.count("topic ") == 10
        message = listing.original()
        assert message is not None

        stranger = await emu.click_button(message, world.bob, "history:next")
        await emu.wait_for_response(stranger)
        assert stranger.ephemeral and "someone else" in stranger.response_data["content"]

        turned = await emu.click_button(message, world.alice, "history:next")
        await emu.wait_for_response(turned)
        second_page = turned.response_data["content"]
    assert "page 2 of 2" in second_page
    assert "topic 01" in second_page and "topic 00" in second_page and "topic 11" not in second_page


async def test_history_shows_only_what_the_caller_may_see(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(guild_commands=False) as bot:
        await emu.send_dm(world.alice, "my private question")
        dm_session = await finished_session(bot, Place(kind="dm", user_id=world.alice.id))
        await mention(world, world.secret, world.alice, "secret plans")
        secret_session = await finished_session(bot, channel_place(world, world.secret))
        await mention(world, world.general, world.bob, "public talk")
        public_session = await finished_session(bot, channel_place(world, world.general))

        async def history(channel: Channel, user: User, **options: str) -> str:
            handle = await emu.invoke_command(channel, user, "history", options)
            await emu.wait_for_response(handle)
            assert handle.ephemeral
            return str(handle.response_data.get("content"))

        bob_guild = await history(world.general, world.bob)
        alice_guild = await history(world.general, world.alice)
        bob_dm = await history(emu.dm_channel(world.bob), world.bob)
        alice_dm = await history(emu.dm_channel(world.alice), world.alice)
        bob_guesses_secret = await history(world.general, world.bob, session=secret_session.id)
        bob_guesses_dm = await history(world.general, world.bob, session=dm_session.id)
        bob_guesses_dm_in_dm = await history(emu.dm_channel(world.bob), world.bob, session=dm_session.id)
        alice_reads_secret = await history(world.general, world.alice, session=secret_session.id)

    assert public_session.id in bob_guild and secret_session.id not in bob_guild and dm_session.id not in bob_guild
    assert public_session.id in alice_guild and secret_session.id in alice_guild and dm_session.id not in alice_guild
    assert dm_session.id not in bob_dm and "No chat sessions" in bob_dm
    assert dm_session.id in alice_dm and public_session.id not in alice_dm
    for refused in (bob_guesses_secret, bob_guesses_dm, bob_guesses_dm_in_dm):
        assert "No session with that ID" in refused and "secret plans" not in refused
    assert "secret plans" in alice_reads_secret


async def test_history_transcript_and_autocomplete(world: World, start_bot: StartBot, code_model_dir: Path) -> None:
    emu = world.emu
    async with start_bot(model_dir=code_model_dir, model={"max_new_tokens": 800}) as bot:
        await mention(world, world.general, world.alice, "short one")
        session = await finished_session(bot, channel_place(world, world.general))
        await mention(world, world.secret, world.alice, "hidden one")
        hidden = await finished_session(bot, channel_place(world, world.secret))

        shown = await emu.invoke_command(world.general, world.alice, "history", {"session": session.id})
        await emu.wait_for_response(shown)

        completion = await emu.autocomplete(world.general, world.bob, "history", {"session": ""}, focused="session")
        await emu.wait_for_response(completion)
    assert shown.ephemeral
    assert "transcript attached" in shown.response_data["content"]
    (attachment,) = shown.response_data["attachments"]
    assert attachment["filename"] == f"session-{session.id}.md"
    assert [c["value"] for c in completion.choices] == [session.id], "bob cannot see #secret"
    assert hidden.id not in str(completion.choices)


# --- the real entry point ----------------------------------------------------------------------------------


async def test_python_m_bot_serves_the_emulator(world: World, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`python -m bot --config FILE` with DISCORD_TOKEN: the path a user takes, pointed at the emulator only
    through `[discord] api_base`."""
    emu = world.emu
    config = tmp_path / "config.toml"
    config.write_text(
        f'[discord]\napi_base = "{emu.api_base}"\nguild_ids = [{world.guild.id}]\n'
        f'[model]\nname = "{tiny_llama_dir}"\ntemperature = 0\nmax_new_tokens = 8\ndevice_map = "cpu"\n'
    )
    async with await BotProcess.start(config, token=emu.token) as bot:
        try:
            await emu.wait_ready(timeout=120)
            await emu.wait_for_call("PUT", rf"/applications/\d+/guilds/{world.guild.id}/commands", timeout=60)
            asked = await mention(world, world.general, world.alice, "are you there?")
            reply = await emu.wait_for_message(world.general, after=asked, timeout=60)
        finally:
            bot.send_signal(signal.SIGINT)
            await bot.wait()
    log = bot.log
    assert reply["message_reference"]["message_id"] == asked["id"]
    assert emu.token not in log, "the token never appears in the log"
    assert " ERROR " not in log and "Traceback" not in log, log
    assert (tmp_path / "data" / "sessions").is_dir()
