"""Run the emulator by hand, to try the bot without Discord:

    python -m discord_emulator --port 8765
    # in another shell, with [discord] api_base = "http://127.0.0.1:8765/api/v10" in your config:
    DISCORD_TOKEN=emulator-token python -m bot --config config.toml

The server looks like Discord in a browser at http://127.0.0.1:8765/ (`python -m bot demo` runs both in one
command). Each line typed here is posted by "alice" in #general, mentioning the bot (start a line with "!" to
post it without the mention); the bot's answer is printed once it is final.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import sys
from collections.abc import Callable

from bot.discord_text import MESSAGE_LIMIT
from bot.reply_stream import STREAMING_MARK

from .demo_world import build_demo_world
from .model import Channel
from .server import DiscordEmulator

# cogs/chat.py's note while a turn waits in the queue: the answer replaces it.
QUEUE_NOTE = re.compile(r"\*queued: \d+ ahead\*")
ANSWER_TIMEOUT_S = 600.0  # a large model on a CPU may take minutes
UNMENTIONED_TIMEOUT_S = 5.0  # the bot answers an unmentioned message in #general only to refuse it
# A message this full may be the first part of a long answer that continues in a new message.
NEARLY_FULL = MESSAGE_LIMIT - 200


async def serve(port: int) -> None:
    async with DiscordEmulator(port=port, strict=False) as emu:
        world = build_demo_world(emu)
        alice = world.people["alice"]
        print(f"Discord emulator on {emu.api_base} (token {emu.token!r}, guild id {world.guild.id})")
        print(f"In a browser: {emu.url}/")
        print("Waiting for a bot to connect...")
        await emu.wait_ready(timeout=3600)
        print("Bot connected. Type a message for it (Ctrl-D quits).")
        while line := await asyncio.to_thread(sys.stdin.readline):
            text = line.strip()
            if not text:
                continue
            mention = not text.startswith("!")
            content = f"{emu.bot_user.mention} {text}" if mention else text[1:]
            asked = await emu.send_message(world.general, alice, content)
            timeout = ANSWER_TIMEOUT_S if mention else UNMENTIONED_TIMEOUT_S
            for answer in await final_answer(emu, world.general, after=int(asked["id"]), timeout=timeout):
                print(f"bot> {answer}")


def answer_so_far(emu: DiscordEmulator, channel: Channel, after: int) -> list[str] | None:
    """The bot's messages after `after` once the last is final (bot/reply_stream.py drops the streaming mark in
    its final edit, made when the answer is stored); None while it is still being written or only queued."""
    contents = [m["content"] for m in emu.bot_messages_in(channel) if int(m["id"]) > after]
    if not contents or contents[-1].endswith(STREAMING_MARK) or QUEUE_NOTE.fullmatch(contents[-1].strip()):
        return None
    return contents


async def final_answer(emu: DiscordEmulator, channel: Channel, *, after: int, timeout: float) -> list[str]:  # noqa: ASYNC109
    """The bot's whole answer to the message `after`, however long it takes to start and however long it pauses
    while streaming; empty when none came within `timeout` seconds."""
    try:
        answer = await wait_for_answer(emu, functools.partial(answer_so_far, emu, channel, after), timeout)
    except TimeoutError:
        return []
    # A full message without the mark can be the first part of a long answer that goes on in a new message.
    while len(answer[-1]) >= NEARLY_FULL:
        longer = functools.partial(answer_longer_than, emu, channel, after, len(answer))
        try:
            answer = await wait_for_answer(emu, longer, 2.0)
        except TimeoutError:
            break
    return answer


async def wait_for_answer(
    emu: DiscordEmulator,
    found: Callable[[], list[str] | None],
    timeout: float,  # noqa: ASYNC109
) -> list[str]:
    answer = await emu.wait_for(found, timeout, "the bot's answer")
    assert answer is not None  # wait_for returns once the predicate's value is truthy
    return answer


def answer_longer_than(emu: DiscordEmulator, channel: Channel, after: int, count: int) -> list[str] | None:
    now = answer_so_far(emu, channel, after)
    return now if now is not None and len(now) > count else None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m discord_emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
