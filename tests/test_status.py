"""`/status` through the Discord API emulator: an administrator (or a Manage Server member) gets the figures,
anyone else a refusal that only they see."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from discord_harness import WATCHED_LOGGERS, bot_settings, finished_session

from bot.client import ChatBot
from bot.config import Settings
from bot.core import build_engine, open_core
from bot.metrics import BotMetrics
from bot.sessions import Place
from cogs.status import ADMINS_ONLY
from discord_emulator import DiscordEmulator, fail_on_logged_errors, run_bot, running_emulator
from discord_emulator.permissions import ADMINISTRATOR

MANAGE_GUILD = 1 << 5


@contextlib.asynccontextmanager
async def status_bot(emu: DiscordEmulator, settings: Settings) -> AsyncIterator[ChatBot]:
    """The bot as `run_discord_bot` builds it."""
    with fail_on_logged_errors(*WATCHED_LOGGERS):
        async with open_core(settings, engine=build_engine(settings)) as core:
            metrics = BotMetrics(settings=settings, engine=core.engine, store=core.store)
            async with (
                ChatBot(settings=settings, core=core, metrics=metrics, guild_ready_timeout=0.1) as bot,
                run_bot(bot, emu, timeout=30),
            ):
                yield bot


async def test_status_shows_admins_the_figures_and_refuses_others(tmp_path: Path, tiny_llama_dir: Path) -> None:
    async with running_emulator() as emu:
        guild = emu.add_guild("llama lovers")
        admins = emu.add_role(guild, "admins", ADMINISTRATOR)
        managers = emu.add_role(guild, "managers", MANAGE_GUILD)
        alice, carol, bob = emu.add_user("alice"), emu.add_user("carol"), emu.add_user("bob")
        emu.add_member(guild, alice, roles=[admins])
        emu.add_member(guild, carol, roles=[managers])
        emu.add_member(guild, bob)
        general = emu.add_text_channel(guild, "general")
        settings = bot_settings(emu, tiny_llama_dir, tmp_path / "data", guild_ids=(guild.id,))

        async with status_bot(emu, settings) as bot:
            await emu.send_message(general, bob, f"{emu.bot_user.mention} hello")
            await finished_session(bot, Place(kind="channel", guild_id=guild.id, channel_id=general.id))
            answers = {}
            for user in (alice, carol, bob):
                handle = await emu.invoke_command(general, user, "status")
                answers[user.username] = await emu.wait_for_response(handle)

    synced = emu.calls("PUT", r"/applications/\d+/guilds/\d+/commands")[-1].json
    (command,) = [c for c in synced if c["name"] == "status"]
    assert int(command["default_member_permissions"]) == ADMINISTRATOR
    assert command["contexts"] == [0]  # guild only

    assert answers["bob"].ephemeral
    assert answers["bob"].response_data["content"] == ADMINS_ONLY
    for name in ("alice", "carol"):
        assert answers[name].ephemeral
        text = answers[name].response_data["content"]
        assert "Backend: local" in text
        assert f"Model: `{tiny_llama_dir}`" in text
        assert "Device: cpu · dtype: float32" in text
        assert "GPU memory: CPU" in text
        assert "Queue: 0 waiting · 0 running" in text
        assert "Sessions stored: 1" in text
        assert "Version: 0.1.0" in text
        speed = re.search(r"Speed: ([\d.]+) tokens/s over the last minute \((\d+) tokens, 1 requests", text)
        assert speed is not None, text
        assert float(speed[1]) > 0 and int(speed[2]) > 0
