"""A Discord API emulator (REST v10 + gateway) that a real discord.py client can connect to.

    async with running_emulator() as emu:
        guild = emu.add_guild("g")
        alice = emu.add_user("alice")
        emu.add_member(guild, alice)
        general = emu.add_text_channel(guild, "general")
        bot = MyBot(...)  # AutoShardedBot without shard_count, guild_ready_timeout=0.1
        with fail_on_logged_errors():
            async with run_bot(bot, emu):  # points discord.py at emu, logs in, connects, waits for on_ready
                await bot.tree.sync()
                msg = await emu.send_message(general, alice, f"{emu.bot_user.mention} hi")
                reply = await emu.wait_for_message(general, after=msg)
                itx = await emu.invoke_command(general, alice, "newchat", {"topic": "x"})
                await emu.wait_for_response(itx)

The bot's requests are recorded (`emu.calls(method, path_regex)`); the messages as Discord holds them
after edits are in `emu.messages_in(channel)`. Leaving `async with` raises if the emulator hit its own
bug or (strict=True) the bot called a route the emulator does not know.
"""

from __future__ import annotations

from .bot_runner import run_bot, running_emulator
from .interactions import InteractionHandle
from .logcheck import ErrorRecords, fail_on_logged_errors
from .model import Channel, Guild, Member, Role, User
from .recording import RecordedCall
from .server import DiscordEmulator
from .store import EPHEMERAL, UploadedFile

__all__ = [
    "EPHEMERAL",
    "Channel",
    "DiscordEmulator",
    "ErrorRecords",
    "Guild",
    "InteractionHandle",
    "Member",
    "RecordedCall",
    "Role",
    "UploadedFile",
    "User",
    "fail_on_logged_errors",
    "run_bot",
    "running_emulator",
]
