"""A whole Discord turn with `[model] backend = "openai"`: the real bot, the Discord API emulator, and a real
OpenAI-compatible server (`transformers serve`) on 127.0.0.1 serving a real small model, or the scripted fake
(tests/fake_openai.py) for what a real small model will not do, such as thinking aloud."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from discord_harness import bot_settings, finished_session, running_chat_bot
from fake_openai import FakeOpenAIServer, Reply
from openai_server import RunningServer, transformers_server

from bot.config import Settings
from bot.engine import RemoteEngine
from bot.errors import ThoughtWithoutAnswerError
from bot.sessions import Place
from discord_emulator import Channel, DiscordEmulator, User, running_emulator


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with running_emulator() as emulator:
        yield emulator


def setup_guild(emu: DiscordEmulator) -> tuple[Channel, User, int]:
    guild = emu.add_guild("remote guild")
    alice = emu.add_user("alice")
    emu.add_member(guild, alice)
    return emu.add_text_channel(guild, "general"), alice, guild.id


async def test_a_discord_turn_through_a_real_openai_compatible_server(
    emu: DiscordEmulator, openai_server: RunningServer, smollm2_dir: Path, tmp_path: Path
) -> None:
    general, alice, guild_id = setup_guild(emu)
    settings = bot_settings(
        emu,
        smollm2_dir,
        tmp_path / "data",
        model={"backend": "openai", "base_url": [openai_server.base_url], "max_new_tokens": 24},
        chat={"system_prompt": ""},
    )
    async with running_chat_bot(emu, settings) as bot:
        assert isinstance(bot.core.engine, RemoteEngine)
        asked = await emu.send_message(general, alice, f"{emu.bot_user.mention} What is the capital of France?")
        reply = await emu.wait_for_message(general, after=asked, timeout=120)
        place = Place(kind="channel", guild_id=guild_id, channel_id=general.id)
        stored = await finished_session(bot, place, timeout=120)
        await emu.wait_for(lambda: emu.message(general, reply["id"])["content"] == stored.messages[-1].content)
    assert "Paris" in stored.messages[-1].content
    assert reply["message_reference"]["message_id"] == asked["id"]


@pytest.mark.remote_server  # starts its own `transformers serve`, not the shared openai_server
async def test_the_server_dying_mid_answer_gives_one_clear_sentence(
    emu: DiscordEmulator, code_model_dir: Path, tmp_path: Path
) -> None:
    general, alice, guild_id = setup_guild(emu)
    with transformers_server(tmp_path) as dying:
        settings = bot_settings(
            emu,
            code_model_dir,
            tmp_path / "data",
            model={"backend": "openai", "base_url": [dying.base_url], "max_new_tokens": 3000},
            discord={"stream_edit_interval": 0.05},
        )
        async with running_chat_bot(emu, settings) as bot:
            asked = await emu.send_message(general, alice, f"{emu.bot_user.mention} write a lot")
            await emu.wait_for_message(general, after=asked, timeout=120)
            dying.process.kill()
            place = Place(kind="channel", guild_id=guild_id, channel_id=general.id)
            await emu.wait_for(
                lambda: any("stopped in the middle" in m["content"] for m in emu.bot_messages_in(general)),
                timeout=60,
            )
            stored = await finished_session(bot, place)
    assert [(m.role, m.status) for m in stored.messages] == [("user", "failed")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    server = FakeOpenAIServer(models=[{"id": "/nonexistent/thinker", "max_model_len": 4096}])
    await server.start()
    yield server
    await server.stop()


def thinker_settings(emu: DiscordEmulator, fake: FakeOpenAIServer, data: Path) -> Settings:
    return bot_settings(
        emu,
        Path("/nonexistent/thinker"),  # no tokenizer: prompts go as messages, fitted by characters
        data,
        model={"backend": "openai", "base_url": [fake.base_url]},
        chat={"system_prompt": ""},
    )


async def test_a_thinking_models_answer_shows_and_is_stored_without_its_thinking(
    emu: DiscordEmulator, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    general, alice, guild_id = setup_guild(emu)
    pieces = ("<thi", "nk>The user wants", " the capital. It is Paris.</thi", "nk>\n\n", "Paris", " is the capital.")
    fake.script.append(Reply(pieces, delay=0.06))  # slower than the edit interval: every step shows in Discord
    seen: set[str] = set()

    def shown() -> bool:
        seen.update(m["content"] for m in emu.bot_messages_in(general))
        return False

    async with running_chat_bot(emu, thinker_settings(emu, fake, tmp_path / "data")) as bot:
        asked = await emu.send_message(general, alice, f"{emu.bot_user.mention} What is the capital of France?")
        watching = asyncio.create_task(emu.wait_for(shown, timeout=30))
        reply = await emu.wait_for_message(general, after=asked, timeout=30)
        place = Place(kind="channel", guild_id=guild_id, channel_id=general.id)
        stored = await finished_session(bot, place)
        await emu.wait_for(lambda: emu.message(general, reply["id"])["content"] == "Paris is the capital.")
        watching.cancel()
    assert stored.messages[-1].content == "Paris is the capital."
    assert seen and not [text for text in seen if "think" in text or "The user" in text]


async def test_a_thinking_model_that_never_answers_says_so_in_discord(
    emu: DiscordEmulator, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    general, alice, guild_id = setup_guild(emu)
    fake.script.append(Reply(("<think>Hmm", ", let me think", " about it some more"), finish="length"))
    async with running_chat_bot(emu, thinker_settings(emu, fake, tmp_path / "data")) as bot:
        asked = await emu.send_message(general, alice, f"{emu.bot_user.mention} Think hard.")
        reply = await emu.wait_for_message(general, after=asked, timeout=30)
        stored = await finished_session(bot, Place(kind="channel", guild_id=guild_id, channel_id=general.id))
    assert reply["content"] == ThoughtWithoutAnswerError.user_message
    assert [(m.role, m.status) for m in stored.messages] == [("user", "failed")]
