"""Runs our bot, built the way `python -m bot` builds it, against the Discord API emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.admission import Admission
from bot.client import ChatBot
from bot.config import Settings, settings_from_mapping
from bot.core import open_core
from bot.discord_api import use_api_base
from bot.metrics import BotMetrics
from bot.sessions import Place, Session
from discord_emulator import Channel, DiscordEmulator, Guild, User, fail_on_logged_errors

# Our own loggers too: an ERROR from the bot is a failed test, like one from discord.py.
WATCHED_LOGGERS = ("discord", "asyncio", "bot", "cogs")


def settings_mapping(
    emu: DiscordEmulator,
    model_dir: Path,
    data_dir: Path,
    *,
    guild_ids: tuple[int, ...] = (),
    discord: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    chat: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The settings of a bot under test, as the sections of a config file."""
    return {
        "discord": {
            "api_base": emu.api_base,
            "guild_ids": list(guild_ids),
            "stream_edit_interval": 0.05,
            **(discord or {}),
        },
        "model": {
            "name": str(model_dir),
            "temperature": 0,
            "max_new_tokens": 12,
            "device_map": "cpu",
            **(model or {}),
        },
        "chat": {"system_prompt": "Be brief.", **(chat or {})},
        "storage": {"data_dir": str(data_dir)},
    }


def bot_settings(emu: DiscordEmulator, model_dir: Path, data_dir: Path, **options: Any) -> Settings:
    """Settings for a bot under test; `options` as for `settings_mapping`."""
    return settings_from_mapping(settings_mapping(emu, model_dir, data_dir, **options))


@contextlib.asynccontextmanager
async def running_chat_bot(emu: DiscordEmulator, settings: Settings) -> AsyncIterator[ChatBot]:
    """Our ChatBot with its core, logged in to the emulator through `[discord] api_base` only."""
    with fail_on_logged_errors(*WATCHED_LOGGERS):
        async with use_api_base(settings.discord.api_base), open_core(settings) as core:
            metrics = BotMetrics(settings=settings, engine=core.engine, store=core.store, personas=core.personas)
            async with ChatBot(settings=settings, core=core, metrics=metrics, guild_ready_timeout=0.1) as bot:
                runner = asyncio.create_task(bot.start(emu.token), name="chat-bot")
                ready = asyncio.create_task(bot.wait_until_ready())
                done, _ = await asyncio.wait({runner, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                if ready not in done:
                    ready.cancel()
                    if runner in done:
                        runner.result()
                    raise TimeoutError("the bot did not become ready")
                try:
                    yield bot
                finally:
                    await bot.close()
                    await runner


# --- `python -m bot` as a child process -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# Lines that mean the bot hit something it did not handle; a clean run's log has none of them.
ERROR_MARKERS = (" ERROR ", " CRITICAL ", "Traceback")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, settings: Mapping[str, Mapping[str, Any]]) -> Path:
    """A TOML file holding `settings` ({section: {key: value}}), for `python -m bot --config`."""
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bot_config(path: Path, emu: DiscordEmulator, model_dir: Path, data_dir: Path, **options: Any) -> Path:
    """The settings `bot_settings` makes, written as a config file for `python -m bot --config`."""
    return write_config(path, settings_mapping(emu, model_dir, data_dir, **options))


class BotProcess:
    """`python -m bot --config FILE` run as a user runs it, with its log collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="bot-process-log")

    @classmethod
    async def start(cls, config: Path, *, token: str, preexec_fn: Callable[[], None] | None = None) -> BotProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "--config",
            str(config),
            cwd=REPO,
            env={**os.environ, "DISCORD_TOKEN": token},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
            self._new_line = asyncio.Event()
        self._new_line.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def errors(self) -> list[str]:
        return [line for line in self.lines if any(marker in line for marker in ERROR_MARKERS)]

    async def wait_for_line(self, text: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        """The first log line containing `text`, waiting for it to be written."""

        async def find() -> str:
            seen = 0
            while True:
                new_line = self._new_line
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"the bot exited without logging {text!r}:\n{self.log}")
                await new_line.wait()

        return await asyncio.wait_for(find(), timeout)

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def wait(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Its exit code, once it has exited and its log is read to the end."""
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def __aenter__(self) -> BotProcess:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # A test that failed half-way must not leave a bot running.
        self.kill()
        await self.wait()


async def finished_session(bot: ChatBot, place: Place, *, turns: int = 1, timeout: float = 30) -> Session:  # noqa: ASYNC109
    """The place's current session once `turns` user messages are stored, the last has its outcome and its asker
    may ask again there (the bot frees a user's slot just after storing the answer)."""
    # Looked up, not isinstance-checked: discord.py loads an extension as a module object of its own, whose ChatCog
    # is another class than an imported cogs.chat's.
    admission = getattr(bot.get_cog("ChatCog"), "admission", None)

    async def poll() -> Session:
        while True:
            session = await bot.core.store.current(place)
            if session is not None and session.turns >= turns:
                last = session.messages[-1]
                asker = next((m.author_id for m in reversed(session.messages) if m.role == "user"), None)
                busy = isinstance(admission, Admission) and asker is not None and admission.is_busy(asker, place.key)
                if (last.role == "assistant" or last.status not in ("ok", "pending")) and not busy:
                    return session
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


@dataclass
class World:
    """The usual test server: #general, #random and #secret (hidden from bob); alice and bob are members."""

    emu: DiscordEmulator
    guild: Guild
    general: Channel
    random: Channel
    secret: Channel
    alice: User
    bob: User
    data_dir: Path

    @property
    def dm(self) -> Channel:
        return self.emu.dm_channel(self.alice)


def build_world(emu: DiscordEmulator, data_dir: Path) -> World:
    guild = emu.add_guild("llama lovers")
    alice = emu.add_user("alice")
    bob = emu.add_user("bob")
    emu.add_member(guild, alice)
    emu.add_member(guild, bob)
    general = emu.add_text_channel(guild, "general")
    random = emu.add_text_channel(guild, "random")
    secret = emu.add_text_channel(guild, "secret", hidden_from=[bob])
    return World(emu, guild, general, random, secret, alice, bob, data_dir)


StartBot = Callable[..., AbstractAsyncContextManager[ChatBot]]


def bot_starter(world: World, default_model_dir: Path) -> StartBot:
    """`async with start(model_dir=..., guild_commands=True, discord={...}, model={...}, chat={...}) as bot:`"""

    def start(*, model_dir: Path | None = None, guild_commands: bool = True, **sections: Any) -> Any:
        settings = bot_settings(
            world.emu,
            model_dir or default_model_dir,
            world.data_dir,
            guild_ids=(world.guild.id,) if guild_commands else (),
            **sections,
        )
        return running_chat_bot(world.emu, settings)

    return start


async def mention(world: World, channel: Channel, author: User, text: str) -> dict[str, Any]:
    return await world.emu.send_message(channel, author, f"{world.emu.bot_user.mention} {text}")


def channel_place(world: World, channel: Channel) -> Place:
    return Place(kind="channel", guild_id=world.guild.id, channel_id=channel.id)


def thread_place(world: World, thread: Channel) -> Place:
    return Place(kind="thread", guild_id=world.guild.id, channel_id=thread.parent_id, thread_id=thread.id)
