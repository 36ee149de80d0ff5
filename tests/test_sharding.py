"""Two shards of one bot, as two ChatBots with `[discord] shard_ids` [0] and [1] of 2, against one emulated Discord:
each gets its own guild's events, answers only there, and keeps that guild's sessions in its own data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from discord_harness import bot_settings, finished_session, running_chat_bot

from bot.client import ChatBot
from bot.config import settings_from_mapping
from bot.errors import ConfigError
from bot.sessions import Place
from discord_emulator import running_emulator


async def test_each_shard_answers_only_its_own_guild(tmp_path: Path, tiny_llama_dir: Path) -> None:
    async with running_emulator(shard_count=2) as emu:
        alice = emu.add_user("alice")
        guilds = [emu.add_guild(f"guild on shard {shard}", shard_id=shard) for shard in (0, 1)]
        channels = []
        for guild in guilds:
            emu.add_member(guild, alice)
            channels.append(emu.add_text_channel(guild, "general"))
        assert [(g.id >> 22) % 2 for g in guilds] == [0, 1]

        def shard(shard_id: int) -> ChatBot:
            settings = bot_settings(
                emu,
                tiny_llama_dir,
                tmp_path / f"data-{shard_id}",  # sessions live with their guild's shard
                guild_ids=(guilds[shard_id].id,),
                discord={"shard_count": 2, "shard_ids": [shard_id]},
            )
            return running_chat_bot(emu, settings)  # type: ignore[return-value]

        async with shard(0) as bot0, shard(1) as bot1:
            assert bot0.shard_count == bot1.shard_count == 2
            assert [g.id for g in bot0.guilds] == [guilds[0].id]
            assert [g.id for g in bot1.guilds] == [guilds[1].id]
            assert emu.gateway.ready_shards() == {0, 1}

            places = [
                Place(kind="channel", guild_id=g.id, channel_id=c.id) for g, c in zip(guilds, channels, strict=True)
            ]
            for channel in channels:
                await emu.send_message(channel, alice, f"{emu.bot_user.mention} hello")
            sessions = [await finished_session(bot, place) for bot, place in zip((bot0, bot1), places, strict=True)]

            assert await bot0.core.store.current(places[1]) is None
            assert await bot1.core.store.current(places[0]) is None
            assert [s.id for s in bot0.core.store.list_sessions()] == [sessions[0].id]
            assert [s.id for s in bot1.core.store.list_sessions()] == [sessions[1].id]
        for channel in channels:
            assert len(emu.bot_messages_in(channel)) == 1, "exactly one shard answered in each guild"
    assert (tmp_path / "data-0" / "sessions" / f"{sessions[0].id}.json").exists()
    assert not (tmp_path / "data-0" / "sessions" / f"{sessions[1].id}.json").exists()


@pytest.mark.parametrize(
    ("discord", "key"),
    [
        ({"shard_ids": [0]}, "discord.shard_ids"),
        ({"shard_count": 2, "shard_ids": [2]}, "discord.shard_ids"),
        ({"shard_count": 2, "shard_ids": [1, 1]}, "discord.shard_ids"),
        ({"shard_count": 0}, "discord.shard_count"),
    ],
)
def test_bad_shard_settings_name_the_key(discord: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"discord": discord})
    assert f"[{key}]" in str(info.value)
