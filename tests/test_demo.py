"""`python -m bot demo` without a browser: its settings, its start-up, the page's API, a restart that keeps the
server and the sessions; and the emulator's terminal prompt waiting for the bot's final edit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from demo_process import final_reply_to, next_event, running_demo, world_of

from bot.demo import demo_settings, model_location
from bot.reply_stream import STREAMING_MARK
from discord_emulator import EPHEMERAL, DiscordEmulator, running_emulator
from discord_emulator.__main__ import final_answer
from discord_emulator.demo_world import build_demo_world
from discord_emulator.snapshot import load_file, save_file
from discord_emulator.store import Store

# Longer than the quiet period the terminal prompt used to take for the end of an answer.
MODEL_PAUSE_S = 2.5


def test_the_demo_settings_point_the_bot_at_the_emulator_and_its_guild(tmp_path: Path) -> None:
    settings = demo_settings(
        api_base="http://127.0.0.1:1234/api/v10", guild_id=42, model=str(tmp_path), gguf_file=None, data_dir=tmp_path
    )
    assert settings.discord.api_base == "http://127.0.0.1:1234/api/v10"
    assert settings.discord.guild_ids == (42,)  # commands synced to the guild show at once
    model = settings.model
    assert (model.name, model.device_map, model.max_new_tokens) == (str(tmp_path), "cpu", 200)
    assert settings.storage.data_dir == tmp_path


def test_the_model_option_takes_a_folder_a_gguf_file_or_a_hub_id(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_location(str(gguf), None) == (str(tmp_path), "model.Q4.gguf")
    assert model_location(str(tmp_path), "other.gguf") == (str(tmp_path), "other.gguf")
    assert model_location("HuggingFaceTB/SmolLM2-360M-Instruct", None) == ("HuggingFaceTB/SmolLM2-360M-Instruct", None)


async def test_python_m_bot_demo_answers_through_the_page_api_and_keeps_its_world(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "demo"
    async with running_demo(tiny_llama_dir, data_dir) as demo, aiohttp.ClientSession() as http:
        async with http.get(demo.url) as page:
            assert page.status == 200
            assert '<script type="module" src="/static/app.js">' in await page.text()
        for name in ("app.js", "composer.js", "markdown.js", "messages.js", "style.css"):
            async with http.get(demo.url + "static/" + name) as static:
                assert static.status == 200, name
        guild, people, channels = world_of(await demo.state())
        assert set(people) == {"llama-bot", "alice", "bob", "carol"}
        assert {"general", "random"} <= set(channels)
        alice, general = people["alice"]["id"], channels["general"]["id"]
        async with http.ws_connect(demo.url + "_demo/events") as ws:
            await next_event(ws, lambda e: e["type"] == "state")
            asked = await demo.post(
                "messages", {"user_id": alice, "channel_id": general, "content": "@llama-bot hello there"}
            )
            assert asked["content"].startswith("<@")  # "@llama-bot" became a mention the bot answers
            answer = await next_event(ws, final_reply_to(asked))
            ran = await demo.post("commands", {"user_id": alice, "channel_id": general, "name": "history"})
            assert ran["responded"]
            listing = await next_event(ws, lambda e: e["type"] == "message" and "turns" in e["message"]["content"])
        assert listing["message"]["flags"] & 64, "the /history answer is ephemeral"
    assert "a new server" in demo.process.log

    async with running_demo(tiny_llama_dir, data_dir) as again:
        assert "the server and sessions of the last run" in again.process.log
        guild, people, channels = world_of(await again.state())
        kept = guild["messages"][general]
        assert [m["id"] for m in kept] == [asked["id"], answer["message"]["id"]]
        assert people["alice"]["id"] == alice
        async with aiohttp.ClientSession() as http, http.ws_connect(again.url + "_demo/events") as ws:
            await next_event(ws, lambda e: e["type"] == "state")
            await again.post("commands", {"user_id": alice, "channel_id": general, "name": "history"})
            relisted = await next_event(ws, lambda e: e["type"] == "message" and "turns" in e["message"]["content"])
    session_id = listing["message"]["content"].rsplit("`", 2)[-2]
    assert session_id in relisted["message"]["content"], "the session from before the restart is listed again"


# --- the terminal prompt (python -m discord_emulator) ------------------------------------------------------


class FakeBot:
    """Sends and edits messages over REST with the bot token, as the bot's StreamingReply does."""

    def __init__(self, emu: DiscordEmulator, http: aiohttp.ClientSession, channel_id: int) -> None:
        self.emu = emu
        self.http = http
        self.url = f"{emu.api_base}/channels/{channel_id}/messages"
        self.headers = {"Authorization": f"Bot {emu.token}"}

    async def send(self, content: str, reply_to: dict[str, Any]) -> dict[str, Any]:
        body = {"content": content, "message_reference": {"message_id": reply_to["id"]}}
        async with self.http.post(self.url, json=body, headers=self.headers) as response:
            return dict(await response.json())

    async def edit(self, message: dict[str, Any], content: str) -> None:
        async with self.http.patch(f"{self.url}/{message['id']}", json={"content": content}, headers=self.headers):
            pass


@pytest.mark.parametrize("pause_before", ["first message", "final edit"])
async def test_the_terminal_prompt_prints_the_answer_after_its_final_edit(pause_before: str) -> None:
    async with running_emulator() as emu, aiohttp.ClientSession() as http:
        world = build_demo_world(emu)
        asked = await emu.send_message(world.general, world.people["alice"], f"{emu.bot_user.mention} hi")
        printed = asyncio.create_task(final_answer(emu, world.general, after=int(asked["id"]), timeout=30))
        bot = FakeBot(emu, http, world.general.id)
        if pause_before == "first message":
            await asyncio.sleep(MODEL_PAUSE_S)  # the model is slow to start (a queue, a long prompt)
        reply = await bot.send("*queued: 1 ahead*", asked)
        await bot.edit(reply, "Hello" + STREAMING_MARK)
        await bot.edit(reply, "Hello there" + STREAMING_MARK)
        if pause_before == "final edit":
            await asyncio.sleep(MODEL_PAUSE_S)  # the stream stalls mid-answer
        assert not printed.done(), "nothing is printed while the answer is still being written"
        await bot.edit(reply, "Hello there, alice.")
        assert await printed == ["Hello there, alice."]


# --- the emulator's saved world -----------------------------------------------------------------------------


async def test_the_saved_world_loads_back_with_its_ids_threads_and_messages(tmp_path: Path) -> None:
    async with running_emulator() as emu:
        world = build_demo_world(emu)
        alice, bob = world.people["alice"], world.people["bob"]
        hidden = emu.add_text_channel(world.guild, "secret", hidden_from=[bob])
        thread = await emu.create_thread(world.general, alice, "a thread", private=True)
        said = await emu.send_message(thread, alice, "in the thread")
        emu.store.create_message(world.general, emu.bot_user, {"content": "for alice only", "flags": EPHEMERAL})
        save_file(emu.store, tmp_path / "world.json")
    async with running_emulator() as again:
        assert load_file(again.store, tmp_path / "world.json")
        store = again.store
        assert again.bot_user.id == emu.bot_user.id and again.application_id == emu.application_id
        assert store.guilds[world.guild.id].members[alice.id].role_ids == world.guild.members[alice.id].role_ids
        assert store.channels[hidden.id].overwrites == hidden.overwrites
        restored = store.channels[thread.id]
        assert (restored.type, restored.parent_id, restored.thread_members) == (
            thread.type,
            world.general.id,
            thread.thread_members,
        )
        assert again.messages_in(thread) == [said]
        assert again.messages_in(world.general) == [], "ephemeral messages are not kept"
        assert not load_file(Store(bot_name="x", base_url=""), tmp_path / "missing.json")
