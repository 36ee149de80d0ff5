"""Command line: `python -m bot [--config FILE] [run | chat | import-history FILE]` (also `llama-discord`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.config import Settings, load_settings, require_secret
from bot.errors import ConfigError

log = logging.getLogger("bot")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llama-discord", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.toml"), help="TOML settings file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the Discord bot (the default)")
    commands.add_parser("chat", help="chat with the model in this terminal, on the same sessions")
    importer = commands.add_parser("import-history", help="import the Gradio app's chat_history.json")
    importer.add_argument("file", type=Path)
    return parser.parse_args(argv)


async def run_chat(settings: Settings) -> None:
    from bot.console import ConsoleChat
    from bot.core import open_core

    async with open_core(settings) as core:
        await ConsoleChat(core).run()


async def run_import(settings: Settings, file: Path) -> None:
    from bot.history import HistoryStore
    from bot.importer import import_gradio_history

    async with HistoryStore(settings.storage.data_dir) as store:
        report = await import_gradio_history(file, store, default_system_prompt=settings.chat.system_prompt)
    print(f"Imported {report.sessions} sessions ({report.messages} messages) from {file}.")
    if report.skipped:
        print(f"Skipped {len(report.skipped)} empty sessions: {', '.join(report.skipped)}")


async def run_bot(settings: Settings) -> None:
    import discord

    from bot.client import run_discord_bot
    from bot.discord_api import ApiBaseUnreachableError

    token = require_secret(settings, "discord.token_env")
    try:
        await run_discord_bot(settings, token=token)
    except discord.LoginFailure:
        raise ConfigError(
            settings.source or "<config>",
            "discord.token_env",
            f"Discord rejected the token in {settings.discord.token_env}",
        ) from None
    except ApiBaseUnreachableError as exc:
        raise ConfigError(settings.source or "<config>", "discord.api_base", str(exc)) from None


def check_start_up(settings: Settings) -> None:
    """GPU-only loading options and the Prometheus endpoint, checked before anything loads."""
    from bot.engine.local.loading import check_loading_supported
    from bot.metrics import check_prometheus_supported

    check_loading_supported(settings)
    check_prometheus_supported(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-8s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
        if args.command != "import-history":
            check_start_up(settings)
        if args.command == "chat":
            asyncio.run(run_chat(settings))
        elif args.command == "import-history":
            asyncio.run(run_import(settings, args.file))
        else:
            asyncio.run(run_bot(settings))
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
