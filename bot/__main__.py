"""Command line: `python -m bot [--config FILE] [run | chat | import-history FILE]` (also `llama-discord`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.config import Settings, load_settings
from bot.demo import add_demo_arguments, demo_main
from bot.errors import ConfigError, StartUpError
from bot.logs import LEVELS, adopt_library_loggers, configure_logging, parse_level
from bot.preflight import check_data_dir
from bot.secrets import require_secret

log = logging.getLogger("bot")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llama-discord", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.toml"), help="TOML settings file")
    parser.add_argument("--log-level", default="INFO", help=", ".join(LEVELS))
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the Discord bot (the default)")
    commands.add_parser("chat", help="chat with the model in this terminal, on the same sessions")
    importer = commands.add_parser("import-history", help="import the Gradio app's chat_history.json")
    importer.add_argument("file", type=Path)
    demo = commands.add_parser("demo", help="the bot and an emulated Discord in a browser (no token, no config)")
    add_demo_arguments(demo)
    return parser.parse_args(argv)


async def run_chat(settings: Settings) -> None:
    from bot.console import ConsoleChat
    from bot.core import open_core

    async with open_core(settings) as core:
        await ConsoleChat(core).run()


async def run_import(settings: Settings, file: Path) -> None:
    from bot.history import HistoryStore
    from bot.importer import ImportFormatError, import_gradio_history, plural

    try:
        async with HistoryStore(settings.storage.data_dir) as store:
            report = await import_gradio_history(file, store, default_system_prompt=settings.chat.system_prompt)
    except ImportFormatError as exc:
        raise StartUpError(f"cannot import {exc}", exit_status=2) from None
    print(f"Imported {plural(report.sessions, 'session')} ({plural(report.messages, 'message')}) from {file}.")
    if report.already_imported:
        already = report.already_imported
        print(f"Skipped {plural(len(already), 'session')} imported before: {', '.join(already)}")
    if report.skipped:
        print(f"Skipped {plural(len(report.skipped), 'empty session')}: {', '.join(report.skipped)}")


async def run_bot(settings: Settings) -> None:
    from bot.client import run_discord_bot

    token = require_secret(settings, "discord.token_env")
    await run_discord_bot(settings, token=token)


def check_start_up(settings: Settings) -> None:
    """GPU-only loading options and the Prometheus endpoint, checked before anything loads."""
    from bot.engine.local.loading import check_loading_supported
    from bot.metrics import check_prometheus_supported

    check_loading_supported(settings)
    check_prometheus_supported(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    level = parse_level(args.log_level)
    if level is None:
        print(f"Error: --log-level {args.log_level!r} is not a level; use one of {', '.join(LEVELS)}", file=sys.stderr)
        return 2
    configure_logging(level)
    try:
        if args.command == "demo":  # no config file: the demo builds its settings (bot/demo.py)
            return demo_main(args)
        settings = load_settings(args.config)
        check_data_dir(settings)
        if args.command != "import-history":
            check_start_up(settings)
            adopt_library_loggers()  # before the model hub or transformers log anything
        if args.command == "chat":
            asyncio.run(run_chat(settings))
        elif args.command == "import-history":
            asyncio.run(run_import(settings, args.file))
        else:
            asyncio.run(run_bot(settings))
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    except StartUpError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
