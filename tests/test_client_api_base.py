"""`[discord] api_base`: discord.py's REST calls and its gateway go where it points, inside `use_api_base` only."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import discord
import discord.http
import pytest
from discord.gateway import DiscordWebSocket

from bot.__main__ import main
from bot.config import DISCORD_API_BASE
from bot.discord_api import ApiBaseUnreachableError, use_api_base
from discord_emulator import fail_on_logged_errors, running_emulator


def discord_py_api() -> tuple[str, str]:
    return discord.http.Route.BASE, str(DiscordWebSocket.DEFAULT_GATEWAY)


async def test_rest_and_gateway_go_to_the_emulator_and_are_restored_after() -> None:
    before = discord_py_api()
    assert before == (DISCORD_API_BASE, "wss://gateway.discord.gg/")
    async with running_emulator() as emu:
        with fail_on_logged_errors():
            async with use_api_base(emu.api_base + "/"):
                assert discord_py_api() == (emu.api_base, emu.gateway_url)
                # A plain Client never asks GET /gateway/bot: it logs in over REST and dials DEFAULT_GATEWAY.
                client = discord.Client(intents=discord.Intents.none())
                await client.login(emu.token)
                connect = asyncio.create_task(client.connect())
                try:
                    await asyncio.wait_for(client.wait_until_ready(), 10)
                    await emu.wait_ready()
                finally:
                    await client.close()
                    await connect
            assert discord_py_api() == before
    assert [c.path for c in emu.calls("GET")][:2] == ["/gateway", "/users/@me"]
    assert not emu.calls("GET", "/gateway/bot")


async def test_discords_own_api_base_changes_nothing_and_blocks_nest() -> None:
    before = discord_py_api()
    async with running_emulator() as emu, use_api_base(emu.api_base):
        async with use_api_base(DISCORD_API_BASE):
            assert discord_py_api() == (DISCORD_API_BASE, emu.gateway_url)
        assert discord_py_api() == (emu.api_base, emu.gateway_url)
    assert discord_py_api() == before


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_no_api_at_the_base_is_one_error_and_changes_nothing() -> None:
    before = discord_py_api()
    with pytest.raises(ApiBaseUnreachableError, match=r"GET http://127\.0\.0\.1:\d+/api/v10/gateway"):
        async with use_api_base(f"http://127.0.0.1:{closed_port()}/api/v10"):
            pytest.fail("entered the block")
    assert discord_py_api() == before


def test_python_m_bot_tells_nothing_answered_at_the_api_base_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[discord]\napi_base = "http://127.0.0.1:{closed_port()}/api/v10"\nlogin_attempts = 1\n'
        f'[model]\nname = "{tmp_path / "no-such-model"}"\ndevice_map = "cpu"\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    monkeypatch.setenv("DISCORD_TOKEN", "unused")
    assert main(["--config", str(config)]) == 1  # an outage, which may pass: not a configuration error
    stderr = capsys.readouterr().err
    assert "Error: cannot reach Discord, tried once: no Discord API answered GET" in stderr
    assert "Traceback" not in stderr
    assert discord_py_api() == (DISCORD_API_BASE, "wss://gateway.discord.gg/")


async def test_an_api_base_that_is_not_discord_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_emulator(strict=False) as emu:  # strict would fail the test on the unknown route
        config = tmp_path / "config.toml"
        config.write_text(
            f'[discord]\napi_base = "{emu.url}/not-the-api"\n'
            f'[model]\nname = "{tmp_path / "no-such-model"}"\ndevice_map = "cpu"\n'
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        )
        monkeypatch.setenv("DISCORD_TOKEN", "unused")
        assert await asyncio.to_thread(main, ["--config", str(config)]) == 2
    stderr = capsys.readouterr().err
    assert f"[discord.api_base] no Discord API answered GET {emu.url}/not-the-api/gateway with a gateway URL" in stderr
