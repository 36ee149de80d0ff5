"""Run the emulator by hand, to try the bot without Discord:

    python -m discord_emulator --port 8765
    # in another shell, with [discord] api_base = "http://127.0.0.1:8765/api/v10" in your config:
    DISCORD_TOKEN=emulator-token python -m bot --config config.toml

Each line typed here is posted by the user "alice" in #general, mentioning the bot (start a line with "!" to
post it without the mention); the bot's messages are printed as Discord holds them after their last edit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .model import Channel
from .server import DiscordEmulator


async def serve(port: int) -> None:
    async with DiscordEmulator(port=port, strict=False) as emu:
        guild = emu.add_guild("emulated guild")
        alice = emu.add_user("alice")
        emu.add_member(guild, alice)
        general = emu.add_text_channel(guild, "general")
        print(f"Discord emulator on {emu.api_base} (token {emu.token!r}, guild id {guild.id})")
        print("Waiting for a bot to connect...")
        await emu.wait_ready(timeout=3600)
        print("Bot connected. Type a message for it (Ctrl-D quits).")
        while line := await asyncio.to_thread(sys.stdin.readline):
            text = line.strip()
            if not text:
                continue
            content = text[1:] if text.startswith("!") else f"{emu.bot_user.mention} {text}"
            asked = await emu.send_message(general, alice, content)
            await print_answer(emu, general, after=int(asked["id"]))


async def print_answer(emu: DiscordEmulator, channel: Channel, *, after: int) -> None:
    """Waits until the bot's messages after `after` stop changing for two seconds, then prints them."""
    snapshot: list[tuple[str, str]] = []
    quiet = 0.0
    while quiet < 2.0:
        await asyncio.sleep(0.25)
        current = [(m["id"], m["content"]) for m in emu.bot_messages_in(channel) if int(m["id"]) > after]
        quiet = quiet + 0.25 if current == snapshot else 0.0
        snapshot = current
    for _, content in snapshot:
        print(f"bot> {content}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m discord_emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
